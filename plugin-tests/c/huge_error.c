/*
 * A plugin whose get fails with a 1 MiB message: 4095 bytes of 'a', then a two-byte character
 * straddling the host's 4096-byte limit, then 'b's. open fails the same way when given the
 * option fail_open. The host must read at most 4096 bytes, cut on a UTF-8 boundary, and go on.
 */
#include <stdlib.h>
#include <string.h>

#include "kms_provider.h"

#define HUGE (1024 * 1024)

static char *huge_message(void) {
    static char *text;
    if (text == NULL) {
        char *t = malloc(HUGE);
        memset(t, 'a', 4095);
        t[4095] = (char)0xc3; /* U+00E9, cut by a 4096-byte limit */
        t[4096] = (char)0xa9;
        memset(t + 4097, 'b', HUGE - 4097);
        text = t;
    }
    return text;
}

static size_t copy_huge(char *buf, size_t cap) {
    memcpy(buf, huge_message(), cap < HUGE ? cap : HUGE);
    return HUGE;
}

static int32_t huge_open(const KmsOption *o, size_t n, const char *d, void **h, KmsMessage *e) {
    (void)d;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(o[i].key, "fail_open") == 0) {
            e->len = copy_huge(e->buf, e->cap);
            return KMS_ERR_INVALID_CONFIG;
        }
    }
    *h = NULL;
    return KMS_OK;
}
static int32_t huge_get(void *h, const char *id, size_t len, KmsKey *key) {
    (void)h, (void)id, (void)len, (void)key;
    return KMS_ERR_UNAVAILABLE;
}
static int32_t huge_create(void *h, const char *id, size_t len, uint32_t k, KmsKey *key) {
    (void)h, (void)id, (void)len, (void)k, (void)key;
    return KMS_ERR_UNAVAILABLE;
}
static uint32_t huge_capabilities(void *h) { (void)h; return 0; }
static void huge_free_key(void *h, uint8_t *p, size_t n) { (void)h, (void)p, (void)n; }
static void huge_close(void *h) { (void)h; }
static size_t huge_last_error(void *h, char *buf, size_t cap) {
    (void)h;
    return copy_huge(buf, cap);
}

static const KmsProviderV1Table table = {
    .abi_version = KMS_ABI_VERSION,
    .table_size = sizeof(KmsProviderV1Table),
    .name = "huge",
    .version = "0.0.1",
    .open = huge_open,
    .get = huge_get,
    .create = huge_create,
    .get_or_create = huge_create,
    .capabilities = huge_capabilities,
    .free_key = huge_free_key,
    .close = huge_close,
    .last_error = huge_last_error,
};

const KmsProviderV1Table *kms_provider_entry(void) { return &table; }
