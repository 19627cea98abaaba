/*
 * PBKDF2-HMAC-SHA256 through OpenSSL, timed: the reference for `kms-bench kdf`.
 *
 * Usage: pbkdf2 ITERATIONS MIN_SECONDS
 * Derives 32-byte keys with PKCS5_PBKDF2_HMAC and EVP_sha256(), one untimed warm-up and then
 * until MIN_SECONDS have passed, and prints "iterations_per_second=<n>". The derived keys are
 * never printed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <openssl/evp.h>

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int derive(int iterations, unsigned char *out)
{
    static const char pass[] = "kms-bench passphrase";
    static const unsigned char salt[16] = "kms-bench salt!";
    return PKCS5_PBKDF2_HMAC(pass, (int)sizeof pass - 1, salt, (int)sizeof salt, iterations,
                             EVP_sha256(), 32, out);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s ITERATIONS MIN_SECONDS\n", argv[0]);
        return 2;
    }
    int iterations = atoi(argv[1]);
    double min_seconds = atof(argv[2]);
    if (iterations < 1 || min_seconds <= 0) {
        fprintf(stderr, "ITERATIONS and MIN_SECONDS must be positive\n");
        return 2;
    }

    unsigned char out[32];
    if (!derive(iterations, out)) {
        fprintf(stderr, "PKCS5_PBKDF2_HMAC failed\n");
        return 1;
    }
    double start = now_seconds();
    double elapsed = 0;
    long rounds = 0;
    while (elapsed < min_seconds) {
        if (!derive(iterations, out)) {
            fprintf(stderr, "PKCS5_PBKDF2_HMAC failed\n");
            return 1;
        }
        rounds++;
        elapsed = now_seconds() - start;
    }
    printf("iterations_per_second=%.0f\n", (double)iterations * (double)rounds / elapsed);
    return 0;
}
