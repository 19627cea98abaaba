/* A full-size table whose required get is NULL. */
#include "kms_provider.h"

static int32_t stub_open(const KmsOption *o, size_t n, const char *d, void **h, KmsMessage *e) {
    (void)o, (void)n, (void)d, (void)e;
    *h = NULL;
    return KMS_OK;
}
static int32_t stub_create(void *h, const char *id, size_t len, uint32_t k, KmsKey *key) {
    (void)h, (void)id, (void)len, (void)k, (void)key;
    return KMS_ERR_UNSUPPORTED;
}
static uint32_t stub_capabilities(void *h) { (void)h; return 0; }
static void stub_free_key(void *h, uint8_t *p, size_t n) { (void)h, (void)p, (void)n; }
static void stub_close(void *h) { (void)h; }
static size_t stub_text(void *h, char *b, size_t c) { (void)h, (void)b, (void)c; return 0; }

static const KmsProviderV1Table table = {
    .abi_version = KMS_ABI_VERSION,
    .table_size = sizeof(KmsProviderV1Table),
    .name = "nullget",
    .version = "0.0.1",
    .open = stub_open,
    .get = NULL,
    .create = stub_create,
    .get_or_create = stub_create,
    .capabilities = stub_capabilities,
    .free_key = stub_free_key,
    .close = stub_close,
    .last_error = stub_text,
};

const KmsProviderV1Table *kms_provider_entry(void) { return &table; }
