/*
 * copy_verify.c -- drives the vm-backup C ABI the way the Bacula plugin shim does: copy a file
 * with progress and log callbacks, verify the copy against its manifest, check that a corrupted
 * copy fails verification with a message, check that NULL arguments and a cancelled handle give
 * error statuses, and free everything. Built and run by tests/c_abi_copy.rs.
 *
 * usage: copy_verify SRC DST MANIFEST CORRUPT
 * prints key=value lines; exits 0 when every check held, 1 otherwise.
 * SPDX-License-Identifier: AGPL-3.0-or-later
 */
#include <stdio.h>
#include <string.h>

#include "vm_backup.h"

struct counters {
    unsigned long progress_calls;
    unsigned long log_calls;
    uint64_t last_done;
    uint64_t last_total;
};

static int failures = 0;

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (!(cond)) {                                          \
            fprintf(stderr, "CHECK FAILED (%s:%d): ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                       \
            fputc('\n', stderr);                                \
            failures++;                                         \
        }                                                       \
    } while (0)

static void on_progress(void *user_data, const char *what, uint64_t done, uint64_t total,
                        double bytes_per_sec) {
    struct counters *c = user_data;
    (void)bytes_per_sec;
    c->progress_calls++;
    c->last_done = done;
    c->last_total = total;
    if (what == NULL || what[0] == '\0') {
        failures++;
        fprintf(stderr, "progress callback without a name\n");
    }
}

static void on_log(void *user_data, vmb_log_level level, const char *text) {
    struct counters *c = user_data;
    c->log_calls++;
    printf("log[%d]=%s\n", (int)level, text);
}

/* Copies `from` to `to` byte for byte with stdio and flips one byte at `offset`. */
static int corrupt_copy(const char *from, const char *to, long offset) {
    FILE *in = fopen(from, "rb");
    FILE *out = fopen(to, "wb");
    char buffer[1 << 16];
    size_t n;
    int byte;
    if (in == NULL || out == NULL) {
        return -1;
    }
    while ((n = fread(buffer, 1, sizeof buffer, in)) > 0) {
        if (fwrite(buffer, 1, n, out) != n) {
            return -1;
        }
    }
    fclose(in);
    if (fclose(out) != 0) {
        return -1;
    }
    out = fopen(to, "r+b");
    if (out == NULL || fseek(out, offset, SEEK_SET) != 0) {
        return -1;
    }
    byte = fgetc(out);
    if (byte == EOF || fseek(out, offset, SEEK_SET) != 0) {
        return -1;
    }
    fputc(byte ^ 0x5a, out);
    return fclose(out);
}

int main(int argc, char **argv) {
    const char *src, *dst, *manifest, *corrupt;
    struct counters counters = {0, 0, 0, 0};
    vmb_copy_options options;
    vmb_copy_result result;
    vmb_verify_result verify;
    vmb_cancel *cancel;
    vmb_status status;
    char *error = NULL;
    char cancelled_dst[4096];

    setvbuf(stdout, NULL, _IOLBF, 0); /* line by line, so a killed run still shows its progress */
    if (argc != 5) {
        fprintf(stderr, "usage: %s SRC DST MANIFEST CORRUPT\n", argv[0]);
        return 2;
    }
    src = argv[1];
    dst = argv[2];
    manifest = argv[3];
    corrupt = argv[4];

    printf("version=%s\n", vmb_version());
    CHECK(vmb_abi_version() == VMB_ABI_VERSION, "ABI %u, header %d", vmb_abi_version(),
          VMB_ABI_VERSION);

    status = vmb_copy_options_default(&options, &error);
    CHECK(status == VMB_OK && error == NULL, "options_default: %d", (int)status);
    options.hash_mode = VMB_HASH_BOTH;
    /* small buffers so that even a small test file gives several progress steps */
    options.buffer_size = 64 * 1024;
    options.chunk_size = 256 * 1024;

    cancel = vmb_cancel_new();
    CHECK(cancel != NULL, "vmb_cancel_new returned NULL");

    /* 1. copy through the ABI */
    memset(&result, 0, sizeof result);
    status = vmb_copy_file(src, dst, &options, manifest, on_progress, on_log, &counters, cancel,
                           &result, &error);
    printf("copy_status=%d\n", (int)status);
    if (status != VMB_OK) {
        printf("copy_error=%s\n", error ? error : "(none)");
        vmb_string_free(error);
        error = NULL;
        failures++;
    } else {
        CHECK(error == NULL, "error set on success");
        printf("sha256=%s\n", result.sha256);
        printf("manifest_root=%s\n", result.manifest_root);
        printf("logical_size=%llu\n", (unsigned long long)result.logical_size);
        printf("bytes_read=%llu\n", (unsigned long long)result.bytes_read);
        printf("bytes_written=%llu\n", (unsigned long long)result.bytes_written);
        printf("holes_skipped=%llu\n", (unsigned long long)result.holes_skipped);
        printf("zero_chunks=%llu\n", (unsigned long long)result.zero_chunks);
        printf("io_path=%u\n", result.io_path);
        printf("seconds=%f\n", result.seconds);
        CHECK(strlen(result.sha256) == 64, "sha256 '%s'", result.sha256);
        CHECK(strlen(result.manifest_root) == 64, "root '%s'", result.manifest_root);
        CHECK(result.io_path == VMB_IO_URING || result.io_path == VMB_IO_THREADS, "io_path %u",
              result.io_path);
    }
    printf("progress_calls=%lu\n", counters.progress_calls);
    printf("progress_last=%llu/%llu\n", (unsigned long long)counters.last_done,
           (unsigned long long)counters.last_total);

    /* 2. the copy verifies against its manifest */
    memset(&verify, 0xff, sizeof verify);
    status = vmb_verify_file(dst, manifest, on_progress, on_log, &counters, cancel, &verify,
                             &error);
    printf("verify_status=%d\n", (int)status);
    CHECK(status == VMB_OK && error == NULL && verify.ok && verify.bad_chunks == 0,
          "verify of the copy: status %d, %s", (int)status, error ? error : "");
    printf("verify_chunks=%llu\n", (unsigned long long)verify.chunks);
    vmb_string_free(error);
    error = NULL;

    /* 3. a corrupted copy fails with a message naming the chunk */
    CHECK(corrupt_copy(dst, corrupt, 300 * 1024) == 0, "cannot write %s", corrupt);
    status = vmb_verify_file(corrupt, manifest, NULL, NULL, NULL, NULL, &verify, &error);
    printf("corrupt_status=%d\n", (int)status);
    printf("corrupt_error=%s\n", error ? error : "(none)");
    printf("corrupt_first_bad_chunk=%llu\n", (unsigned long long)verify.first_bad_chunk);
    printf("corrupt_first_bad_offset=%llu\n", (unsigned long long)verify.first_bad_offset);
    CHECK(status == VMB_ERR_VERIFY_MISMATCH, "corrupted copy: status %d", (int)status);
    CHECK(error != NULL && strstr(error, "chunk") != NULL, "corrupted copy: no message");
    CHECK(!verify.ok && verify.bad_chunks == 1 && verify.first_bad_chunk == 1,
          "corrupted copy: ok %d, bad %llu, first %llu", verify.ok,
          (unsigned long long)verify.bad_chunks, (unsigned long long)verify.first_bad_chunk);
    vmb_string_free(error);
    error = NULL;

    /* 4. NULL arguments give a status and a message, not a crash */
    status = vmb_copy_file(NULL, dst, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &error);
    printf("null_status=%d\n", (int)status);
    printf("null_error=%s\n", error ? error : "(none)");
    printf("null_status_str=%s\n", vmb_status_str(status));
    CHECK(status == VMB_ERR_NULL_ARGUMENT && error != NULL, "NULL src: status %d", (int)status);
    vmb_string_free(error);
    error = NULL;
    status = vmb_verify_file(dst, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
    CHECK(status == VMB_ERR_NULL_ARGUMENT, "NULL manifest without error out: %d", (int)status);

    /* 5. a cancelled handle stops a copy and leaves no destination behind */
    vmb_cancel_request(cancel);
    CHECK(vmb_cancel_is_requested(cancel), "cancel not recorded");
    snprintf(cancelled_dst, sizeof cancelled_dst, "%s.cancelled", dst);
    status = vmb_copy_file(src, cancelled_dst, &options, NULL, NULL, NULL, NULL, cancel, NULL,
                           &error);
    printf("cancel_status=%d\n", (int)status);
    printf("cancel_error=%s\n", error ? error : "(none)");
    CHECK(status == VMB_ERR_CANCELLED, "cancelled copy: status %d", (int)status);
    vmb_string_free(error);
    error = NULL;

    vmb_cancel_free(cancel);
    vmb_string_free(NULL);
    vmb_cancel_free(NULL);
    printf("failures=%d\n", failures);
    return failures == 0 ? 0 : 1;
}
