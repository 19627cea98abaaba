/*
 * kms_example.c: an example kms provider plugin in C.
 *
 * Keys live in memory, in a table guarded by a mutex, and are drawn from the kernel's CSPRNG
 * with getrandom(2). Nothing survives the process, so the plugin does not claim KMS_CAP_DURABLE.
 * It shows every part of the ABI: options, errors with messages kept per thread, key buffers
 * zeroized by free_key, listing through the host's callback, versions and a display name.
 *
 * Build:
 *     cc -shared -fPIC -O2 -Wall -Wextra -I include \
 *        -o libkms_c_example.so examples/plugin-c/kms_example.c
 *
 * Use (the provider name "c-example" finds libkms_c_example.so):
 *     [provider]
 *     name = "c-example"
 *     [provider.options]
 *     label = "demo"      # optional: shown in the display name
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "kms_provider.h"

#define MAX_ID 255

struct version {
    uint8_t bytes[32];
    uint32_t len;
    uint64_t created;
};

struct entry {
    char id[MAX_ID + 1];
    size_t id_len;
    struct version *versions;
    uint32_t n_versions;
};

struct store {
    pthread_mutex_t lock;
    struct entry *entries;
    size_t n_entries;
    size_t cap_entries;
    char label[64];
};

/* The message of this thread's last failure: the host reads it right after the failed call. */
static _Thread_local char last_error_text[512];
static _Thread_local size_t last_error_len;

static int32_t fail(int32_t status, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vsnprintf(last_error_text, sizeof last_error_text, format, args);
    va_end(args);
    last_error_len = n < 0 ? 0 : (size_t)n < sizeof last_error_text ? (size_t)n
                                                                     : sizeof last_error_text - 1;
    return status;
}

/* Copies at most cap bytes of text and returns its full length, as the ABI asks. */
static size_t copy_text(const char *text, size_t len, char *buf, size_t cap) {
    if (buf != NULL)
        memcpy(buf, text, len < cap ? len : cap);
    return len;
}

static void put_message(KmsMessage *message, const char *text) {
    if (message != NULL)
        message->len = copy_text(text, strlen(text), message->buf, message->cap);
}

static int fill_random(uint8_t *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = getrandom(buf + done, len - done, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static int valid_key_len(uint32_t len) {
    return len == 16 || len == 24 || len == 32;
}

/* The entry of an id, or NULL. Call with the lock held. */
static struct entry *find(struct store *s, const char *id, size_t id_len) {
    for (size_t i = 0; i < s->n_entries; i++)
        if (s->entries[i].id_len == id_len && memcmp(s->entries[i].id, id, id_len) == 0)
            return &s->entries[i];
    return NULL;
}

/* Hands version number `index` (from 0) of an entry to the host in a fresh buffer. */
static int32_t hand_out(const struct entry *e, uint32_t index, KmsKey *key) {
    const struct version *v = &e->versions[index];
    uint8_t *buf = malloc(v->len);
    if (buf == NULL)
        return fail(KMS_ERR_OTHER, "out of memory");
    memcpy(buf, v->bytes, v->len);
    key->ptr = buf;
    key->len = v->len;
    key->version = index + 1;
    return KMS_OK;
}

/* Appends a new random version to an entry. Call with the lock held. */
static int32_t add_version(struct entry *e, uint32_t key_len) {
    struct version *grown = realloc(e->versions, (e->n_versions + 1) * sizeof *grown);
    if (grown == NULL)
        return fail(KMS_ERR_OTHER, "out of memory");
    e->versions = grown;
    struct version *v = &grown[e->n_versions];
    if (fill_random(v->bytes, key_len) != 0)
        return fail(KMS_ERR_OTHER, "getrandom failed: %s", strerror(errno));
    v->len = key_len;
    v->created = (uint64_t)time(NULL);
    e->n_versions++;
    return KMS_OK;
}

/* Adds a new entry with one version. Call with the lock held. */
static int32_t add_entry(struct store *s, const char *id, size_t id_len, uint32_t key_len,
                         struct entry **added) {
    if (s->n_entries == s->cap_entries) {
        size_t cap = s->cap_entries ? s->cap_entries * 2 : 16;
        struct entry *grown = realloc(s->entries, cap * sizeof *grown);
        if (grown == NULL)
            return fail(KMS_ERR_OTHER, "out of memory");
        s->entries = grown;
        s->cap_entries = cap;
    }
    struct entry *e = &s->entries[s->n_entries];
    memset(e, 0, sizeof *e);
    memcpy(e->id, id, id_len);
    e->id_len = id_len;
    int32_t status = add_version(e, key_len);
    if (status != KMS_OK)
        return status;
    s->n_entries++;
    *added = e;
    return KMS_OK;
}

static int32_t example_open(const KmsOption *options, size_t n_options, const char *config_dir,
                            void **handle, KmsMessage *error) {
    (void)config_dir; /* this plugin has no files: nothing to resolve */
    struct store *s = calloc(1, sizeof *s);
    if (s == NULL) {
        put_message(error, "out of memory");
        return KMS_ERR_OTHER;
    }
    strcpy(s->label, "default");

    /* Options are strict: an unknown one is an error, as in every kms provider. */
    for (size_t i = 0; i < n_options; i++) {
        const KmsOption *o = &options[i];
        if (strcmp(o->key, "label") == 0 && strcmp(o->tag, "string") == 0 &&
            strlen(o->value) < sizeof s->label) {
            strcpy(s->label, o->value);
        } else {
            char text[160];
            snprintf(text, sizeof text,
                     "options of provider \"c-example\": unknown or bad option \"%.64s\"", o->key);
            put_message(error, text);
            free(s);
            return KMS_ERR_INVALID_CONFIG;
        }
    }
    pthread_mutex_init(&s->lock, NULL);
    *handle = s;
    return KMS_OK;
}

static int32_t example_get(void *handle, const char *id, size_t id_len, KmsKey *key) {
    struct store *s = handle;
    pthread_mutex_lock(&s->lock);
    struct entry *e = find(s, id, id_len);
    int32_t status = e ? hand_out(e, e->n_versions - 1, key)
                       : fail(KMS_ERR_NOT_FOUND, "key \"%s\" not found", id);
    pthread_mutex_unlock(&s->lock);
    return status;
}

static int32_t example_get_version(void *handle, const char *id, size_t id_len,
                                   uint32_t version, KmsKey *key) {
    struct store *s = handle;
    pthread_mutex_lock(&s->lock);
    struct entry *e = find(s, id, id_len);
    int32_t status = e && version >= 1 && version <= e->n_versions
                         ? hand_out(e, version - 1, key)
                         : fail(KMS_ERR_NOT_FOUND, "key \"%s\" has no version %u", id, version);
    pthread_mutex_unlock(&s->lock);
    return status;
}

static int32_t example_create(void *handle, const char *id, size_t id_len, uint32_t key_len,
                              KmsKey *key) {
    struct store *s = handle;
    if (!valid_key_len(key_len))
        return fail(KMS_ERR_INVALID_INPUT, "a key has 16, 24 or 32 bytes, not %u", key_len);
    pthread_mutex_lock(&s->lock);
    struct entry *e = NULL;
    int32_t status = find(s, id, id_len) ? fail(KMS_ERR_ALREADY_EXISTS,
                                                "key \"%s\" already exists", id)
                                         : add_entry(s, id, id_len, key_len, &e);
    if (status == KMS_OK)
        status = hand_out(e, 0, key);
    pthread_mutex_unlock(&s->lock);
    return status;
}

/* One critical section over the lookup and the insert: racing callers get the same key. */
static int32_t example_get_or_create(void *handle, const char *id, size_t id_len,
                                     uint32_t key_len, KmsKey *key) {
    struct store *s = handle;
    if (!valid_key_len(key_len))
        return fail(KMS_ERR_INVALID_INPUT, "a key has 16, 24 or 32 bytes, not %u", key_len);
    pthread_mutex_lock(&s->lock);
    struct entry *e = find(s, id, id_len);
    int32_t status = e ? KMS_OK : add_entry(s, id, id_len, key_len, &e);
    if (status == KMS_OK)
        status = hand_out(e, e->n_versions - 1, key);
    pthread_mutex_unlock(&s->lock);
    return status;
}

static int32_t example_rotate(void *handle, const char *id, size_t id_len, uint32_t key_len,
                              KmsKey *key) {
    struct store *s = handle;
    if (!valid_key_len(key_len))
        return fail(KMS_ERR_INVALID_INPUT, "a key has 16, 24 or 32 bytes, not %u", key_len);
    pthread_mutex_lock(&s->lock);
    struct entry *e = find(s, id, id_len);
    int32_t status = e ? add_version(e, key_len)
                       : fail(KMS_ERR_NOT_FOUND, "key \"%s\" not found", id);
    if (status == KMS_OK)
        status = hand_out(e, e->n_versions - 1, key);
    pthread_mutex_unlock(&s->lock);
    return status;
}

static int entry_order(const void *a, const void *b) {
    const struct entry *x = *(const struct entry *const *)a, *y = *(const struct entry *const *)b;
    size_t n = x->id_len < y->id_len ? x->id_len : y->id_len;
    int c = memcmp(x->id, y->id, n);
    return c != 0 ? c : (x->id_len > y->id_len) - (x->id_len < y->id_len);
}

static int32_t example_list(void *handle, const char *prefix, size_t prefix_len,
                            kms_list_callback callback, void *context) {
    struct store *s = handle;
    pthread_mutex_lock(&s->lock);

    /* Sort a list of pointers, so that the host receives the ids in order. */
    const struct entry **sorted = malloc((s->n_entries + 1) * sizeof *sorted);
    if (sorted == NULL) {
        pthread_mutex_unlock(&s->lock);
        return fail(KMS_ERR_OTHER, "out of memory");
    }
    size_t n = 0;
    for (size_t i = 0; i < s->n_entries; i++)
        if (s->entries[i].id_len >= prefix_len &&
            memcmp(s->entries[i].id, prefix, prefix_len) == 0)
            sorted[n++] = &s->entries[i];
    qsort(sorted, n, sizeof *sorted, entry_order);

    /* The callback is the host's: it never calls back into the plugin, so holding the lock
     * across it is safe. */
    int32_t status = KMS_OK;
    for (size_t i = 0; i < n && status == KMS_OK; i++) {
        const struct version *newest = &sorted[i]->versions[sorted[i]->n_versions - 1];
        KmsKeyInfo info = {
            .id = sorted[i]->id,
            .id_len = sorted[i]->id_len,
            .version = sorted[i]->n_versions,
            .key_len = newest->len,
            .created = newest->created,
        };
        status = callback(context, &info);
    }
    free(sorted);
    pthread_mutex_unlock(&s->lock);
    return status;
}

static int32_t example_delete_key(void *handle, const char *id, size_t id_len) {
    struct store *s = handle;
    pthread_mutex_lock(&s->lock);
    struct entry *e = find(s, id, id_len);
    int32_t status = KMS_OK;
    if (e == NULL) {
        status = fail(KMS_ERR_NOT_FOUND, "key \"%s\" not found", id);
    } else {
        explicit_bzero(e->versions, e->n_versions * sizeof *e->versions);
        free(e->versions);
        *e = s->entries[--s->n_entries];
    }
    pthread_mutex_unlock(&s->lock);
    return status;
}

static uint32_t example_capabilities(void *handle) {
    (void)handle;
    return KMS_CAP_LIST | KMS_CAP_DELETE | KMS_CAP_VERSIONS; /* in memory: not durable */
}

static void example_free_key(void *handle, uint8_t *ptr, size_t len) {
    (void)handle;
    if (ptr != NULL) {
        explicit_bzero(ptr, len);
        free(ptr);
    }
}

static void example_close(void *handle) {
    struct store *s = handle;
    for (size_t i = 0; i < s->n_entries; i++) {
        explicit_bzero(s->entries[i].versions, s->entries[i].n_versions * sizeof(struct version));
        free(s->entries[i].versions);
    }
    free(s->entries);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static size_t example_last_error(void *handle, char *buf, size_t cap) {
    (void)handle;
    return copy_text(last_error_text, last_error_len, buf, cap);
}

static size_t example_display_name(void *handle, char *buf, size_t cap) {
    struct store *s = handle;
    char name[128];
    int n = snprintf(name, sizeof name, "c example provider (%s)", s->label);
    return copy_text(name, n < 0 ? 0 : (size_t)n, buf, cap);
}

#ifndef KMS_EXAMPLE_AS_REVISION_1

static const KmsProviderV1Table table = {
    .abi_version = KMS_ABI_VERSION,
    .table_size = sizeof(KmsProviderV1Table),
    .name = "c-example",
    .version = "0.1.0",
    .open = example_open,
    .init = NULL, /* in memory: nothing to initialise */
    .get = example_get,
    .create = example_create,
    .get_or_create = example_get_or_create,
    .list = example_list,
    .delete_key = example_delete_key,
    .capabilities = example_capabilities,
    .free_key = example_free_key,
    .close = example_close,
    .last_error = example_last_error,
    .get_version = example_get_version,
    .rotate = example_rotate,
    .display_name = example_display_name,
};

#else

/*
 * The tests also build this file as a plugin of revision 1, the table as the first header
 * declared it: it ends after last_error. The host must load it, must not read past its end,
 * and must treat the revision 2 functions as missing (versions unsupported, a default name).
 */
struct revision_1_table {
    uint32_t abi_version;
    uint32_t table_size;
    const char *name;
    const char *version;
    kms_open_fn open;
    kms_init_fn init;
    kms_get_fn get;
    kms_create_fn create;
    kms_create_fn get_or_create;
    kms_list_fn list;
    kms_delete_fn delete_key;
    kms_capabilities_fn capabilities;
    kms_free_key_fn free_key;
    kms_close_fn close;
    kms_text_fn last_error;
};

_Static_assert(sizeof(struct revision_1_table) == KMS_PROVIDER_V1_REVISION_1_SIZE,
               "revision 1 is the prefix of the table up to last_error");

static const struct revision_1_table table = {
    .abi_version = KMS_ABI_VERSION,
    .table_size = sizeof(struct revision_1_table),
    .name = "c-example",
    .version = "0.1.0-r1",
    .open = example_open,
    .init = NULL,
    .get = example_get,
    .create = example_create,
    .get_or_create = example_get_or_create,
    .list = example_list,
    .delete_key = example_delete_key,
    .capabilities = example_capabilities,
    .free_key = example_free_key,
    .close = example_close,
    .last_error = example_last_error,
};

/* Unused in this build: revision 1 has no slot for them. */
static kms_get_version_fn unused_get_version __attribute__((unused)) = example_get_version;
static kms_create_fn unused_rotate __attribute__((unused)) = example_rotate;
static kms_text_fn unused_display_name __attribute__((unused)) = example_display_name;

#endif

__attribute__((visibility("default"))) const KmsProviderV1Table *kms_provider_entry(void) {
    return (const KmsProviderV1Table *)&table;
}
