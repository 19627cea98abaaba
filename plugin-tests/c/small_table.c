/* A table smaller than revision 1: the host must refuse it without reading past its end. */
#include "kms_provider.h"

struct tiny_table {
    uint32_t abi_version;
    uint32_t table_size;
    const char *name;
    const char *version;
    kms_open_fn open;
};

static const struct tiny_table table = {
    .abi_version = KMS_ABI_VERSION,
    .table_size = sizeof(struct tiny_table),
    .name = "small",
    .version = "0.0.1",
};

const KmsProviderV1Table *kms_provider_entry(void) {
    return (const KmsProviderV1Table *)&table;
}
