/* A plugin of a future ABI version. Only its first two fields may be read. */
#include "kms_provider.h"

static const KmsProviderV1Table table = {
    .abi_version = 999,
    .table_size = sizeof(KmsProviderV1Table),
    .name = "abi999",
    .version = "9.9.9",
};

const KmsProviderV1Table *kms_provider_entry(void) { return &table; }
