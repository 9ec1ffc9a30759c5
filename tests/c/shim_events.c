/*
 * shim_events.c -- drives the File Daemon plugin vm-backup-fd.so the way the 9.6 File Daemon
 * does, without Bacula: loads it with dlopen, hands it a bFuncs whose JobMessage records every
 * message, and sends it the events of an estimate job. Checks that the plugin's identity comes
 * from the engine library, that other plugins' commands are left alone, that the virtual files
 * are listed and recognised by checkFile, and that every failure (a bad plugin string, a read
 * without a buffer, a seek, events out of order) ends the job with an M_FATAL message.
 * Built and run by tests/plugin_shim.rs.
 *
 * usage: shim_events PLUGIN_SO TARGET_DIR VERSION DATE
 * prints key=value lines and every job message as msg[TYPE]=TEXT; exits 0 when every check
 * held, 1 otherwise.
 * SPDX-License-Identifier: AGPL-3.0-or-later
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bacula_fd_plugin.h"

static int failures = 0;
static int fatals = 0;
static char last_fatal[4096];

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "CHECK FAILED (%s:%d): ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
            failures++;                                                    \
        }                                                                  \
    } while (0)

static bRC job_message(bpContext *ctx, const char *file, int line, int type, int64_t mtime,
                       const char *fmt, ...) {
    char text[4096];
    va_list args;
    (void)ctx; (void)file; (void)line; (void)mtime;
    va_start(args, fmt);
    vsnprintf(text, sizeof text, fmt, args);
    va_end(args);
    text[strcspn(text, "\n")] = '\0';
    printf("msg[%d]=%s\n", type, text);
    if (type == BFD_M_FATAL) {
        fatals++;
        snprintf(last_fatal, sizeof last_fatal, "%s", text);
    }
    return bRC_OK;
}

static bRC get_value(bpContext *ctx, bVariable var, void *value) {
    (void)ctx; (void)var; (void)value;
    return bRC_Error;
}

/* Sends an event; returns the plugin's answer. */
static bRC event(pFuncs *p, bpContext *ctx, bEventType type, const char *value) {
    bEvent e = {.eventType = type};
    return p->handlePluginEvent(ctx, &e, (void *)value);
}

/* Whether the last call added exactly one fatal message containing `needle`. */
static int one_more_fatal(int before, const char *needle) {
    return fatals == before + 1 && strstr(last_fatal, needle) != NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s PLUGIN_SO TARGET_DIR VERSION DATE\n", argv[0]);
        return 2;
    }
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
        return 1;
    }
    bRC (*load)(bInfo *, bFuncs *, pInfo **, pFuncs **);
    *(void **)(&load) = dlsym(h, "loadPlugin");
    if (!load) {
        fprintf(stderr, "no loadPlugin\n");
        return 1;
    }
    bInfo binfo = {sizeof(bInfo), BFD_INTERFACE_VERSION};
    bFuncs funcs;
    memset(&funcs, 0, sizeof funcs);
    funcs.size = sizeof funcs;
    funcs.version = BFD_INTERFACE_VERSION;
    funcs.JobMessage = job_message;
    funcs.getBaculaValue = get_value;
    pInfo *info = NULL;
    pFuncs *p = NULL;
    CHECK(load(&binfo, &funcs, &info, &p) == bRC_OK, "loadPlugin");
    if (!info || !p) return 1;

    /* The identity comes from the engine library. */
    printf("version=%s\ndate=%s\ndescription=%s\n", info->plugin_version, info->plugin_date,
           info->plugin_description);
    CHECK(strcmp(info->plugin_version, argv[3]) == 0, "version %s", info->plugin_version);
    CHECK(strcmp(info->plugin_date, argv[4]) == 0, "date %s", info->plugin_date);
    CHECK(strncmp(info->plugin_description, "vm-backup: ", 11) == 0, "description %s",
          info->plugin_description);

    bpContext ctx = {0};
    CHECK(p->newPlugin(&ctx) == bRC_OK, "newPlugin");
    CHECK(event(p, &ctx, bEventJobStart, "JobId=7 Job=shim.test") == bRC_OK, "JobStart");
    CHECK(event(p, &ctx, bEventLevel, (const char *)(intptr_t)'F') == bRC_OK, "Level");

    /* Another plugin's command is not ours: nothing happens. */
    CHECK(event(p, &ctx, bEventPluginCommand, "bpipe:/x:a:b") == bRC_OK, "bpipe");
    CHECK(fatals == 0, "a foreign command gave a fatal message");

    /* Events out of order end the job. */
    struct save_pkt sp;
    memset(&sp, 0, sizeof sp);
    sp.pkt_size = sizeof sp;
    sp.pkt_end = sizeof sp;
    int before = fatals;
    CHECK(p->startBackupFile(&ctx, &sp) == bRC_Error, "startBackupFile before a command");
    CHECK(one_more_fatal(before, "vm-backup: startBackupFile before a backup command"),
          "out of order: %s", last_fatal);

    /* An estimate lists the two metadata files under the virtual root. */
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "vm-backup: vm=web01 target=%s", argv[2]);
    CHECK(event(p, &ctx, bEventEstimateCommand, cmd) == bRC_OK, "estimate: %s", last_fatal);
    int files = 0;
    for (;;) {
        memset(&sp, 0, sizeof sp);
        sp.pkt_size = sizeof sp;
        sp.pkt_end = sizeof sp;
        if (p->startBackupFile(&ctx, &sp) != bRC_OK) {
            CHECK(0, "startBackupFile: %s", last_fatal);
            break;
        }
        files++;
        printf("file=%s\n", sp.fname);
        CHECK(sp.fname && strncmp(sp.fname, "/@vm-backup/web01/", 18) == 0, "fname %s",
              sp.fname ? sp.fname : "(null)");
        CHECK(sp.no_read, "an estimate reads nothing");
        CHECK(p->checkFile(&ctx, sp.fname) == bRC_Seen, "checkFile %s", sp.fname);
        bRC more = p->endBackupFile(&ctx);
        if (more != bRC_More) {
            CHECK(more == bRC_OK, "endBackupFile");
            break;
        }
        if (files > 10) break;
    }
    CHECK(files == 2, "files=%d", files);
    CHECK(p->checkFile(&ctx, "/etc/passwd") == bRC_OK, "checkFile /etc/passwd");

    /* pluginIO failures end the job, with the packet saying so. */
    struct io_pkt io;
    memset(&io, 0, sizeof io);
    io.pkt_size = sizeof io;
    io.pkt_end = sizeof io;
    io.func = BFD_IO_READ;
    io.count = 16;
    before = fatals;
    CHECK(p->pluginIO(&ctx, &io) == bRC_Error, "read without buffer");
    CHECK(io.status == -1 && io.io_errno != 0, "read without buffer: status %d", io.status);
    CHECK(one_more_fatal(before, "buffer"), "read without buffer: %s", last_fatal);
    io.func = BFD_IO_SEEK;
    io.status = 0;
    before = fatals;
    CHECK(p->pluginIO(&ctx, &io) == bRC_Error, "seek");
    CHECK(io.status == -1 && io.io_errno == ESPIPE, "seek: errno %d", io.io_errno);
    CHECK(one_more_fatal(before, "seek"), "seek: %s", last_fatal);

    /* A malformed plugin string ends the job with the engine's message. */
    before = fatals;
    CHECK(event(p, &ctx, bEventBackupCommand, "vm-backup: vm=web01 colour=red") == bRC_Error,
          "bad string");
    CHECK(one_more_fatal(before, "vm-backup: plugin string: unknown key \"colour\""),
          "bad string: %s", last_fatal);

    CHECK(event(p, &ctx, bEventCancelCommand, NULL) == bRC_OK, "cancel");
    CHECK(p->freePlugin(&ctx) == bRC_OK, "freePlugin");
    printf("fatals=%d\nfailures=%d\n", fatals, failures);
    return failures == 0 ? 0 : 1;
}
