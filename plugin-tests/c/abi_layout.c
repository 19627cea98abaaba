/* Prints what the C header says, one "name value" per line, for comparison with abi.rs. */
#include <stdio.h>

#include "kms_provider.h"

#define FIELD(f) printf("offset.%s %zu\n", #f, offsetof(KmsProviderV1Table, f))
#define CONST(c) printf("const.%s %lld\n", #c, (long long)(c))

int main(void) {
    printf("size.table %zu\n", sizeof(KmsProviderV1Table));
    printf("size.revision_1 %zu\n", (size_t)KMS_PROVIDER_V1_REVISION_1_SIZE);
    printf("size.revision_2 %zu\n", (size_t)KMS_PROVIDER_V1_REVISION_2_SIZE);
    printf("size.option %zu\n", sizeof(KmsOption));
    printf("size.key %zu\n", sizeof(KmsKey));
    printf("size.key_info %zu\n", sizeof(KmsKeyInfo));
    printf("size.message %zu\n", sizeof(KmsMessage));
    printf("offset.key_version %zu\n", offsetof(KmsKey, version));
    printf("offset.info_created %zu\n", offsetof(KmsKeyInfo, created));
    printf("offset.message_len %zu\n", offsetof(KmsMessage, len));
    FIELD(abi_version); FIELD(table_size); FIELD(name); FIELD(version);
    FIELD(open); FIELD(init); FIELD(get); FIELD(create); FIELD(get_or_create); FIELD(list);
    FIELD(delete_key); FIELD(capabilities); FIELD(free_key); FIELD(close); FIELD(last_error);
    FIELD(get_version); FIELD(rotate); FIELD(display_name);
    FIELD(import);
    CONST(KMS_ABI_VERSION); CONST(KMS_OK); CONST(KMS_ERR_OTHER); CONST(KMS_MESSAGE_CAP);
    CONST(KMS_ERR_NOT_FOUND); CONST(KMS_ERR_ALREADY_EXISTS); CONST(KMS_ERR_INVALID_KEY_ID);
    CONST(KMS_ERR_INVALID_INPUT); CONST(KMS_ERR_WRONG_KEK); CONST(KMS_ERR_WRONG_PASSPHRASE);
    CONST(KMS_ERR_CORRUPTED); CONST(KMS_ERR_UNAVAILABLE); CONST(KMS_ERR_DENIED);
    CONST(KMS_ERR_INVALID_CONFIG); CONST(KMS_ERR_INSECURE); CONST(KMS_ERR_UNSUPPORTED);
    CONST(KMS_ERR_NO_SPACE); CONST(KMS_ERR_PLUGIN);
    CONST(KMS_CAP_LIST); CONST(KMS_CAP_DELETE); CONST(KMS_CAP_VERSIONS); CONST(KMS_CAP_DURABLE);
    return 0;
}
