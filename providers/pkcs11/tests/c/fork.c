/*
 * Uses libkms_pkcs11.so across fork(): opened in the parent, used in the child (which must
 * initialise the PKCS#11 module again and log in again), then in the parent again.
 *
 * usage: fork PLUGIN STORE_DIR MODULE TOKEN KEY_LABEL PIN_ENV
 * Prints one line per step; exits 0 when every step gave the expected key.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kms_provider.h"

static const KmsProviderV1Table *table;
static void *handle;

static void fail(const char *what, int32_t rc) {
    char buf[1024];
    size_t len = table->last_error(handle, buf, sizeof buf - 1);
    buf[len < sizeof buf - 1 ? len : sizeof buf - 1] = 0;
    fprintf(stderr, "[%d] %s failed with %d: %s\n", (int)getpid(), what, (int)rc, buf);
    exit(1);
}

static KmsKey fetch(const char *id) {
    KmsKey key = {0};
    int32_t rc = table->get(handle, id, strlen(id), &key);
    if (rc != KMS_OK) fail("get", rc);
    return key;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: fork PLUGIN STORE_DIR MODULE TOKEN KEY_LABEL PIN_ENV\n");
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    const KmsProviderV1Table *(*entry)(void) =
        (const KmsProviderV1Table *(*)(void))dlsym(lib, KMS_PROVIDER_ENTRY);
    if (!entry) return 1;
    table = entry();

    KmsOption options[] = {
        {"dir", "string", argv[2]},       {"module", "string", argv[3]},
        {"token_label", "string", argv[4]}, {"key_label", "string", argv[5]},
        {"pin_env", "string", argv[6]},
    };
    char text[1024];
    KmsMessage error = {text, sizeof text - 1, 0};
    int32_t rc = table->open(options, 5, "", &handle, &error);
    if (rc != KMS_OK) {
        text[error.len < sizeof text - 1 ? error.len : sizeof text - 1] = 0;
        fprintf(stderr, "open failed with %d: %s\n", (int)rc, text);
        return 1;
    }

    /* 1. The parent makes a key (its session pool now holds logged-in sessions). */
    KmsKey made = {0};
    rc = table->get_or_create(handle, "fork/parent", 11, 32, &made);
    if (rc != KMS_OK) fail("get_or_create", rc);
    printf("parent made a key\n");
    fflush(stdout);

    /* 2. The child reads it and makes one of its own through the inherited provider. */
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid == 0) {
        KmsKey got = fetch("fork/parent");
        if (got.len != made.len || memcmp(got.ptr, made.ptr, made.len) != 0) {
            fprintf(stderr, "child read another key\n");
            _exit(1);
        }
        KmsKey own = {0};
        rc = table->create(handle, "fork/child", 10, 32, &own);
        if (rc != KMS_OK) fail("create in the child", rc);
        printf("child read the parent's key and made its own\n");
        fflush(stdout);
        _exit(0);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "the child failed\n");
        return 1;
    }

    /* 3. The parent still works, and sees the child's key. */
    KmsKey again = fetch("fork/parent");
    if (again.len != made.len || memcmp(again.ptr, made.ptr, made.len) != 0) {
        fprintf(stderr, "parent read another key\n");
        return 1;
    }
    fetch("fork/child");
    printf("parent still works and reads the child's key\n");
    table->free_key(handle, made.ptr, made.len);
    table->free_key(handle, again.ptr, again.len);
    table->close(handle);
    return 0;
}
