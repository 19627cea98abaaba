/* A shared library that is not a kms plugin: it has no kms_provider_entry. */
int kms_something_else(void) { return 42; }
