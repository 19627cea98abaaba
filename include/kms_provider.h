/*
 * kms_provider.h: the C ABI of kms provider plugins, version 1 (revision 2).
 *
 * A plugin is a shared library, libkms_<name>.so, that exports one symbol:
 *
 *     const KmsProviderV1Table *kms_provider_entry(void);
 *
 * returning a pointer to a static table. The host reads abi_version and table_size first and
 * nothing else unless abi_version is KMS_ABI_VERSION and table_size is at least
 * KMS_PROVIDER_V1_REVISION_1_SIZE. The guide is docs/plugin-guide.md; this header is the
 * reference, and kms-core/src/plugin/abi.rs is its Rust twin (a test checks that they agree).
 *
 * Evolution. Within ABI version 1 the table only grows: a new revision appends fields at the
 * end and never moves, removes or retypes one. A plugin sets table_size to sizeof the table it
 * was compiled with; the host uses a field only if table_size covers it, and treats a field
 * the plugin does not have as NULL. An incompatible change makes a new ABI version, and the
 * host refuses plugins of a version it does not speak.
 *
 * Threads. The host calls a handle's functions from any thread, concurrently: they must be
 * thread-safe. last_error is called on the thread of the failed call, right after it.
 *
 * Memory. Strings the host passes are valid during the call only. A key buffer the plugin
 * returns stays the plugin's: the host copies it and hands it back to free_key, which must
 * zeroize it before freeing it. Text the plugin returns is copied into buffers the host owns,
 * at most `cap` bytes, with no NUL needed; the host reads at most 4096 bytes of any text.
 */
#ifndef KMS_PROVIDER_H
#define KMS_PROVIDER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI major version this header describes. */
#define KMS_ABI_VERSION 1

/* The name of the entry symbol. */
#define KMS_PROVIDER_ENTRY "kms_provider_entry"

/*
 * Status codes. 0 is success; any other value is an error kind, whose message the host then
 * reads through last_error (or, for open and init, from their message buffer). The numbers are
 * stable: they are kms_core::ErrorKind::number(), except "other", whose number 0 is taken by
 * success and which crosses as -1. A status the host does not know reads as "other".
 */
#define KMS_OK 0
#define KMS_ERR_OTHER (-1)
#define KMS_ERR_NOT_FOUND 1         /* the backend said definitely: no such key */
#define KMS_ERR_ALREADY_EXISTS 2    /* create of an id that exists */
#define KMS_ERR_INVALID_KEY_ID 3    /* a key id or prefix broke the rules */
#define KMS_ERR_INVALID_INPUT 4     /* another malformed request (a key length, a version) */
#define KMS_ERR_WRONG_KEK 5         /* the KEK does not match the store */
#define KMS_ERR_WRONG_PASSPHRASE 6  /* the passphrase unlocked nothing */
#define KMS_ERR_CORRUPTED 7         /* stored data failed its integrity checks */
#define KMS_ERR_UNAVAILABLE 8       /* the backend could not be reached; retrying may help */
#define KMS_ERR_DENIED 9            /* the backend refused the caller */
#define KMS_ERR_INVALID_CONFIG 10   /* the options are wrong */
#define KMS_ERR_INSECURE 11         /* unsafe ownership or permissions of a secret file */
#define KMS_ERR_UNSUPPORTED 12      /* the provider cannot do this at all */
#define KMS_ERR_NO_SPACE 13         /* the disk is full */
#define KMS_ERR_PLUGIN 14           /* the plugin itself misbehaved */

/* Capability bits returned by capabilities(). */
#define KMS_CAP_LIST 1u      /* list works */
#define KMS_CAP_DELETE 2u    /* delete_key works */
#define KMS_CAP_VERSIONS 4u  /* rotate and get_version work */
#define KMS_CAP_DURABLE 8u   /* keys survive the process */

/* The most bytes of text the host reads from a plugin. */
#define KMS_MESSAGE_CAP 4096

/*
 * One entry of the [provider.options] table: three NUL-terminated UTF-8 strings. The tag says
 * how to read the value:
 *   "string"   the string itself
 *   "integer"  decimal text of an int64_t (strtoll)
 *   "float"    text strtod reads back exactly, including "inf", "-inf" and "NaN"
 *   "boolean"  "true" or "false"
 *   "toml"     any other value (array, inline table, date-time) as TOML text
 */
typedef struct KmsOption {
    const char *key;
    const char *tag;
    const char *value;
} KmsOption;

/* A key the plugin returns: its own buffer, released by free_key. */
typedef struct KmsKey {
    uint8_t *ptr;     /* the key bytes, allocated by the plugin */
    size_t len;       /* 16, 24 or 32 (1 to 1024 for an imported secret) */
    uint32_t version; /* counted from 1 */
} KmsKey;

/* What list reports of one key; valid during the callback only. */
typedef struct KmsKeyInfo {
    const char *id;   /* the key id bytes, not NUL-terminated */
    size_t id_len;
    uint32_t version; /* the newest version */
    uint32_t key_len; /* its length in bytes: 16, 24 or 32 (1 to 1024: a secret) */
    uint64_t created; /* seconds since the Unix epoch, 0 if unknown */
} KmsKeyInfo;

/*
 * A text buffer of the host, for open and init: copy at most cap bytes of the message into buf
 * (no NUL needed) and set len to the message's full length.
 */
typedef struct KmsMessage {
    char *buf;
    size_t cap;
    size_t len;
} KmsMessage;

/*
 * The host's list callback: returns 0 to go on; on any other value, stop listing and return
 * that value.
 */
typedef int32_t (*kms_list_callback)(void *context, const KmsKeyInfo *info);

/*
 * Key ids. An id arrives as (id, id_len): 1 to 255 bytes of [A-Za-z0-9._:/-], already
 * validated by the host, followed by a NUL byte not counted in id_len (so it may be used as a
 * C string). A prefix arrives the same way and may be empty.
 *
 * Keys. On success, functions returning a key fill *key with a buffer of the plugin; on
 * failure they leave *key untouched (the host frees a buffer it finds there anyway).
 * key_len (in create, get_or_create, rotate) is 16, 24 or 32.
 */

/*
 * Opens a provider. options holds n_options entries (options may be NULL when n_options is 0).
 * config_dir is the directory of the configuration file, which relative paths in the options
 * are relative to; "" means the current directory. On success store an opaque handle (may be
 * NULL) in *handle; on failure write the message to *error.
 */
typedef int32_t (*kms_open_fn)(const KmsOption *options, size_t n_options,
                               const char *config_dir, void **handle, KmsMessage *error);
/* Initialises storage (kms init): on success the message is the line to print. */
typedef int32_t (*kms_init_fn)(const KmsOption *options, size_t n_options,
                               const char *config_dir, KmsMessage *message);
typedef int32_t (*kms_get_fn)(void *handle, const char *id, size_t id_len, KmsKey *key);
typedef int32_t (*kms_create_fn)(void *handle, const char *id, size_t id_len, uint32_t key_len,
                                 KmsKey *key);
typedef int32_t (*kms_get_version_fn)(void *handle, const char *id, size_t id_len,
                                      uint32_t version, KmsKey *key);
/* Stores a secret of 1 to 1024 bytes (the host's buffer; copy it) as version 1 of id, or
 * KMS_ERR_ALREADY_EXISTS; on success *key holds the stored secret, like create's key. */
typedef int32_t (*kms_import_fn)(void *handle, const char *id, size_t id_len,
                                 const uint8_t *secret, size_t secret_len, KmsKey *key);
typedef int32_t (*kms_list_fn)(void *handle, const char *prefix, size_t prefix_len,
                               kms_list_callback callback, void *context);
typedef int32_t (*kms_delete_fn)(void *handle, const char *id, size_t id_len);
typedef uint32_t (*kms_capabilities_fn)(void *handle);
/* Zeroizes and frees a key buffer; must not change the thread's last error. */
typedef void (*kms_free_key_fn)(void *handle, uint8_t *ptr, size_t len);
/* Releases the handle; called once, after every other call on it has returned. */
typedef void (*kms_close_fn)(void *handle);
/* Copies at most cap bytes of text into buf and returns the text's full length. */
typedef size_t (*kms_text_fn)(void *handle, char *buf, size_t cap);

/*
 * The function table. Fields marked "required" must not be NULL; the host refuses the plugin
 * otherwise. A NULL optional function is an unsupported operation, and the host clears the
 * matching capability bit whatever capabilities() says.
 */
typedef struct KmsProviderV1Table {
    uint32_t abi_version;   /* KMS_ABI_VERSION */
    uint32_t table_size;    /* sizeof(KmsProviderV1Table) as compiled */
    const char *name;       /* the provider name, [A-Za-z0-9_-]{1,64}, static */
    const char *version;    /* the plugin's version, static, at most 64 bytes */

    /* Revision 1 (the base: the smallest table the host accepts). */
    kms_open_fn open;                   /* required */
    kms_init_fn init;                   /* optional: nothing to initialise */
    kms_get_fn get;                     /* required: newest version, or KMS_ERR_NOT_FOUND */
    kms_create_fn create;               /* required: or KMS_ERR_ALREADY_EXISTS */
    kms_create_fn get_or_create;        /* required: atomic across threads and processes */
    kms_list_fn list;                   /* optional: keys whose id starts with prefix */
    kms_delete_fn delete_key;           /* optional: every version; or KMS_ERR_NOT_FOUND */
    kms_capabilities_fn capabilities;   /* required */
    kms_free_key_fn free_key;           /* required */
    kms_close_fn close;                 /* required */
    kms_text_fn last_error;             /* required: message of this thread's last failure */

    /* Revision 2. */
    kms_get_version_fn get_version;     /* optional: or KMS_ERR_NOT_FOUND */
    kms_create_fn rotate;               /* optional: a new version; KMS_ERR_NOT_FOUND if none */
    kms_text_fn display_name;           /* optional: secret-free name for logs and errors */

    /* Revision 3. */
    kms_import_fn import;               /* optional: store a secret made elsewhere */
} KmsProviderV1Table;

/* The size of a revision 1 table: the fields up to last_error. */
#define KMS_PROVIDER_V1_REVISION_1_SIZE offsetof(KmsProviderV1Table, get_version)
/* The size of a revision 2 table: the fields up to display_name. */
#define KMS_PROVIDER_V1_REVISION_2_SIZE offsetof(KmsProviderV1Table, import)

/* The entry point every plugin defines. */
const KmsProviderV1Table *kms_provider_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* KMS_PROVIDER_H */
