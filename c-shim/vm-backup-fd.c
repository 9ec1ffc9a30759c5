/*
 * vm-backup-fd.so: the Bacula 9.6 File Daemon plugin of vm-backup.
 *
 * This shim holds no backup logic. It translates the File Daemon's plugin events into calls of
 * the engine's C ABI (include/vm_backup.h, the vmb_job_* functions of libvm_backup.so) and the
 * engine's job-log lines into JobMessage calls. FileSet syntax:
 *
 *   Plugin = "vm-backup: vm=<name> [method=...] [target=<dir>] [mode=direct|stream] [config=<file>]"
 *
 * The engine library is loaded with dlopen when the File Daemon loads the plugin, from the first
 * of: $VMB_LIBRARY; libvm_backup.so in the same folder as this plugin; the path compiled in as
 * VMB_DEFAULT_LIBRARY (the cargo target folder of the build); libvm_backup.so on the loader's
 * search path. dlopen rather than linking keeps this .so buildable before the Rust library exists
 * (build.rs runs first) and lets an installation place both files in the Plugin Directory.
 * If the library cannot be loaded, the plugin still loads, and every job that uses it fails with
 * the loader's message in the job log.
 *
 * Threads: every event arrives on the job's File Daemon thread, except bEventCancelCommand,
 * which arrives on the Director connection thread; vmb_job_cancel only sets an atomic flag.
 * All state is per instance (ctx->pContext); the only globals are written once in loadPlugin.
 *
 * SPDX-License-Identifier: AGPL-3.0-or-later
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bacula_fd_plugin.h"
#include "vm_backup.h"

#ifndef VMB_DEFAULT_LIBRARY
#define VMB_DEFAULT_LIBRARY "/usr/lib/vm-backup/libvm_backup.so"
#endif
#ifndef VMB_PLUGIN_VERSION
#define VMB_PLUGIN_VERSION "0.1.0"
#endif

#define VIRTUAL_PREFIX "/@vm-backup/"
/* Only the two entry points are exported (the shim is built with -fvisibility=hidden). */
#define VMB_EXPORT __attribute__((visibility("default")))

/* ---- the engine's functions, resolved with dlsym ------------------------------------------ */

struct vmb_api {
    __typeof__(&vmb_job_new) job_new;
    __typeof__(&vmb_job_free) job_free;
    __typeof__(&vmb_job_cancel) job_cancel;
    __typeof__(&vmb_job_start) job_start;
    __typeof__(&vmb_job_set_level) job_set_level;
    __typeof__(&vmb_job_set_since) job_set_since;
    __typeof__(&vmb_is_our_command) is_our_command;
    __typeof__(&vmb_job_command) job_command;
    __typeof__(&vmb_job_next_file) job_next_file;
    __typeof__(&vmb_job_end_file) job_end_file;
    __typeof__(&vmb_job_open) job_open;
    __typeof__(&vmb_job_read) job_read;
    __typeof__(&vmb_job_write) job_write;
    __typeof__(&vmb_job_close) job_close;
    __typeof__(&vmb_job_restore_command) job_restore_command;
    __typeof__(&vmb_job_create_file) job_create_file;
    __typeof__(&vmb_job_end_restore_file) job_end_restore_file;
};

/* Written once in loadPlugin (on the File Daemon's main thread), read-only afterwards. */
static bFuncs *bfuncs;
static struct vmb_api api;
static void *engine_handle;
static char load_error[1024];

/* ---- per-job state ------------------------------------------------------------------------ */

struct instance {
    bpContext *ctx;
    VmbJob *job; /* NULL when the engine library could not be loaded */
    int ours;    /* a vm-backup: command was seen in this job */
};

static struct instance *inst(bpContext *ctx) {
    return ctx ? (struct instance *)ctx->pContext : NULL;
}

/* ---- messages ----------------------------------------------------------------------------- */

static int bacula_type(enum VmbMessageLevel level) {
    switch (level) {
    case VMB_MESSAGE_LEVEL_WARNING: return BFD_M_WARNING;
    case VMB_MESSAGE_LEVEL_ERROR: return BFD_M_ERROR;
    case VMB_MESSAGE_LEVEL_FATAL: return BFD_M_FATAL;
    default: return BFD_M_INFO;
    }
}

static void on_message(void *opaque, enum VmbMessageLevel level, const char *text) {
    bpContext *ctx = (bpContext *)opaque;
    if (getenv("VMB_SHIM_TRACE")) { fprintf(stderr, "%ld vmb: %s\n", (long)time(NULL), text ? text : ""); fflush(stderr); }
    if (bfuncs && bfuncs->JobMessage && ctx && text) {
        bfuncs->JobMessage(ctx, __FILE__, __LINE__, bacula_type(level), 0, "%s\n", text);
    }
}

static void fatal(bpContext *ctx, const char *what) {
    if (bfuncs && bfuncs->JobMessage && ctx) {
        bfuncs->JobMessage(ctx, __FILE__, __LINE__, BFD_M_FATAL, 0, "vm-backup: %s\n", what);
    }
}

/* Fails the current job when the engine is missing; returns the instance otherwise. */
static struct instance *engine_or_fail(bpContext *ctx) {
    struct instance *in = inst(ctx);
    if (!in) return NULL;
    if (!in->job) {
        fatal(ctx, load_error[0] ? load_error : "the engine library is not loaded");
        return NULL;
    }
    return in;
}

static int packet_ok(bpContext *ctx, int32_t got, size_t want, const char *name) {
    if (got == (int32_t)want) return 1;
    char text[160];
    snprintf(text, sizeof text, "%s size %d differs from the %zu this plugin was built for "
             "(File Daemon version mismatch)", name, (int)got, want);
    fatal(ctx, text);
    return 0;
}

/* ---- loading the engine ------------------------------------------------------------------- */

static int resolve(void *h) {
#define SYM(field, name)                                                                      \
    do {                                                                                      \
        *(void **)(&api.field) = dlsym(h, #name);                                             \
        if (!api.field) {                                                                     \
            snprintf(load_error, sizeof load_error, "engine library lacks %s", #name);        \
            return 0;                                                                         \
        }                                                                                     \
    } while (0)
    SYM(job_new, vmb_job_new);
    SYM(job_free, vmb_job_free);
    SYM(job_cancel, vmb_job_cancel);
    SYM(job_start, vmb_job_start);
    SYM(job_set_level, vmb_job_set_level);
    SYM(job_set_since, vmb_job_set_since);
    SYM(is_our_command, vmb_is_our_command);
    SYM(job_command, vmb_job_command);
    SYM(job_next_file, vmb_job_next_file);
    SYM(job_end_file, vmb_job_end_file);
    SYM(job_open, vmb_job_open);
    SYM(job_read, vmb_job_read);
    SYM(job_write, vmb_job_write);
    SYM(job_close, vmb_job_close);
    SYM(job_restore_command, vmb_job_restore_command);
    SYM(job_create_file, vmb_job_create_file);
    SYM(job_end_restore_file, vmb_job_end_restore_file);
#undef SYM
    return 1;
}

static int try_load(const char *path) {
    if (!path || !*path) return 0;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *err = dlerror();
        snprintf(load_error, sizeof load_error, "cannot load the engine library %s: %s", path,
                 err ? err : "unknown error");
        return 0;
    }
    if (!resolve(h)) {
        dlclose(h);
        return 0;
    }
    engine_handle = h;
    load_error[0] = '\0';
    return 1;
}

static void load_engine(void) {
    if (try_load(getenv("VMB_LIBRARY"))) return;
    Dl_info self;
    if (dladdr((void *)&load_engine, &self) && self.dli_fname) {
        char beside[PATH_MAX];
        const char *slash = strrchr(self.dli_fname, '/');
        if (slash && (size_t)(slash - self.dli_fname) + sizeof "/libvm_backup.so" < sizeof beside) {
            snprintf(beside, sizeof beside, "%.*s/libvm_backup.so",
                     (int)(slash - self.dli_fname), self.dli_fname);
            if (access(beside, R_OK) == 0 && try_load(beside)) return;
        }
    }
    if (access(VMB_DEFAULT_LIBRARY, R_OK) == 0 && try_load(VMB_DEFAULT_LIBRARY)) return;
    if (try_load("libvm_backup.so")) return;
    fprintf(stderr, "vm-backup-fd: %s\n", load_error);
}

/* ---- plugin entry points ------------------------------------------------------------------ */

static bRC newPlugin(bpContext *ctx) {
    struct instance *in = calloc(1, sizeof *in);
    if (!in) return bRC_Error;
    in->ctx = ctx;
    if (engine_handle) {
        VmbJobCallbacks cb = {.opaque = ctx, .message = on_message};
        in->job = api.job_new(&cb);
    }
    ctx->pContext = in;
    return bRC_OK;
}

static bRC freePlugin(bpContext *ctx) {
    struct instance *in = inst(ctx);
    if (!in) return bRC_OK;
    if (in->job) api.job_free(in->job); /* releases everything the job still holds */
    free(in);
    ctx->pContext = NULL;
    return bRC_OK;
}

static bRC getPluginValue(bpContext *ctx, pVariable var, void *value) {
    (void)ctx; (void)var; (void)value;
    return bRC_OK;
}

static bRC setPluginValue(bpContext *ctx, pVariable var, void *value) {
    (void)ctx; (void)var; (void)value;
    return bRC_OK;
}

static int is_ours(const char *cmd) {
    return cmd && strncmp(cmd, "vm-backup:", 10) == 0;
}

static bRC command(bpContext *ctx, enum VmbCommand kind, const char *cmd) {
    struct instance *in = inst(ctx);
    if (!in || !is_ours(cmd)) return bRC_OK;
    in->ours = 1;
    if (!engine_or_fail(ctx)) return bRC_Error;
    return api.job_command(in->job, kind, cmd) == 0 ? bRC_OK : bRC_Error;
}

static bRC handlePluginEvent(bpContext *ctx, bEvent *event, void *value) {
    struct instance *in = inst(ctx);
    if (!in || !event) return bRC_OK;
    switch (event->eventType) {
    case bEventJobStart:
        if (in->job) api.job_start(in->job, (const char *)value);
        return bRC_OK;
    case bEventLevel:
        if (in->job) api.job_set_level(in->job, (int)(intptr_t)value);
        return bRC_OK;
    case bEventSince:
        if (in->job) api.job_set_since(in->job, (int64_t)(intptr_t)value);
        return bRC_OK;
    case bEventCancelCommand: /* from the Director connection thread */
        if (in->job) api.job_cancel(in->job);
        return bRC_OK;
    case bEventPluginCommand:
        return command(ctx, VMB_COMMAND_CHECK, (const char *)value);
    case bEventBackupCommand:
        return command(ctx, VMB_COMMAND_BACKUP, (const char *)value);
    case bEventEstimateCommand:
        return command(ctx, VMB_COMMAND_ESTIMATE, (const char *)value);
    case bEventRestoreCommand: {
        const char *cmd = (const char *)value;
        if (!is_ours(cmd)) return bRC_OK;
        in->ours = 1;
        if (!engine_or_fail(ctx)) return bRC_Error;
        char *where = NULL;
        int replace = 'a';
        if (bfuncs->getBaculaValue(ctx, bVarWhere, &where) != bRC_OK) where = NULL;
        if (bfuncs->getBaculaValue(ctx, bVarReplace, &replace) != bRC_OK) replace = 'a';
        return api.job_restore_command(in->job, cmd, where ? where : "", replace) == 0
                   ? bRC_OK : bRC_Error;
    }
    default:
        return bRC_OK;
    }
}

static bRC startBackupFile(bpContext *ctx, struct save_pkt *sp) {
    struct instance *in = engine_or_fail(ctx);
    if (!in || !sp) return bRC_Error;
    if (!packet_ok(ctx, sp->pkt_size, sizeof *sp, "save_pkt")) return bRC_Error;
    VmbFileInfo f;
    memset(&f, 0, sizeof f);
    int rc = api.job_next_file(in->job, &f);
    if (rc < 0) return bRC_Error;
    if (rc == 0) {
        fatal(ctx, "no file to save (internal error)");
        return bRC_Error;
    }
    memset(&sp->statp, 0, sizeof sp->statp);
    sp->fname = (char *)f.path;
    sp->link = NULL;
    sp->statp.st_nlink = 1;
    sp->statp.st_size = (off_t)f.size;
    sp->statp.st_blksize = 65536;
    sp->statp.st_blocks = (blkcnt_t)((f.size + 511) / 512);
    sp->statp.st_mtime = sp->statp.st_atime = sp->statp.st_ctime = (time_t)f.mtime;
    if (f.kind == VMB_FILE_KIND_DIRECTORY) {
        sp->type = BFD_FT_DIREND;
        sp->link = (char *)f.path; /* folders are cataloged by their link (with trailing '/') */
        sp->statp.st_mode = S_IFDIR | (f.mode & 07777);
    } else {
        sp->type = BFD_FT_REG;
        sp->statp.st_mode = S_IFREG | (f.mode & 07777);
    }
    sp->no_read = f.no_read;
    return bRC_OK;
}

static bRC endBackupFile(bpContext *ctx) {
    struct instance *in = engine_or_fail(ctx);
    if (!in) return bRC_Error;
    int rc = api.job_end_file(in->job);
    return rc > 0 ? bRC_More : rc == 0 ? bRC_OK : bRC_Error;
}

static bRC startRestoreFile(bpContext *ctx, const char *cmd) {
    (void)cmd;
    return engine_or_fail(ctx) ? bRC_OK : bRC_Error;
}

static bRC endRestoreFile(bpContext *ctx) {
    struct instance *in = engine_or_fail(ctx);
    if (!in) return bRC_Error;
    return api.job_end_restore_file(in->job) == 0 ? bRC_OK : bRC_Error;
}

static bRC pluginIO(bpContext *ctx, struct io_pkt *io) {
    struct instance *in = engine_or_fail(ctx);
    if (!in || !io) return bRC_Error;
    if (!packet_ok(ctx, io->pkt_size, sizeof *io, "io_pkt")) return bRC_Error;
    io->status = 0;
    io->io_errno = 0;
    io->lerror = 0;
    int64_t n;
    switch (io->func) {
    case BFD_IO_OPEN:
        if (api.job_open(in->job, (io->flags & (O_WRONLY | O_RDWR)) != 0) != 0) goto failed;
        return bRC_OK;
    case BFD_IO_READ:
        if (!io->buf || io->count < 0) goto failed;
        n = api.job_read(in->job, (uint8_t *)io->buf, (size_t)io->count);
        if (n < 0) goto failed;
        io->status = (int32_t)n;
        return bRC_OK;
    case BFD_IO_WRITE:
        if (!io->buf || io->count < 0) goto failed;
        n = api.job_write(in->job, (const uint8_t *)io->buf, (size_t)io->count);
        if (n < 0) goto failed;
        io->status = (int32_t)n;
        return bRC_OK;
    case BFD_IO_CLOSE:
        if (api.job_close(in->job) != 0) goto failed;
        return bRC_OK;
    default: /* SEEK: the plugin's files are sequential */
        io->status = -1;
        io->io_errno = ESPIPE;
        return bRC_Error;
    }
failed:
    io->status = -1;
    io->io_errno = EIO;
    return bRC_Error;
}

static bRC createFile(bpContext *ctx, struct restore_pkt *rp) {
    struct instance *in = engine_or_fail(ctx);
    if (!in || !rp) return bRC_Error;
    if (!packet_ok(ctx, rp->pkt_size, sizeof *rp, "restore_pkt")) return bRC_Error;
    enum VmbCreate what = VMB_CREATE_SKIP;
    if (api.job_create_file(in->job, rp->ofname, rp->where ? rp->where : "", rp->replace, &what) != 0) {
        rp->create_status = BFD_CF_ERROR;
        return bRC_Error;
    }
    rp->create_status = what == VMB_CREATE_EXTRACT ? BFD_CF_EXTRACT
                        : what == VMB_CREATE_CREATED ? BFD_CF_CREATED
                                                     : BFD_CF_SKIP;
    return bRC_OK;
}

static bRC setFileAttributes(bpContext *ctx, struct restore_pkt *rp) {
    (void)ctx; (void)rp;
    return bRC_OK;
}

/* Accurate mode asks about files it did not see; ours are virtual, never "deleted". */
static bRC checkFile(bpContext *ctx, char *fname) {
    (void)ctx;
    return fname && strncmp(fname, VIRTUAL_PREFIX, strlen(VIRTUAL_PREFIX)) == 0 ? bRC_Seen : bRC_OK;
}

/* ---- registration ------------------------------------------------------------------------- */

static pInfo plugin_info = {
    sizeof(pInfo),
    BFD_INTERFACE_VERSION,
    BFD_PLUGIN_MAGIC,
    "AGPLv3",
    "vm-backup authors",
    "2026-11-22",
    VMB_PLUGIN_VERSION,
    "vm-backup: KVM/libvirt virtual machine backups (vm=<name> method= target= mode= config=)",
};

static pFuncs plugin_funcs = {
    sizeof(pFuncs),
    BFD_INTERFACE_VERSION,
    newPlugin,
    freePlugin,
    getPluginValue,
    setPluginValue,
    handlePluginEvent,
    startBackupFile,
    endBackupFile,
    startRestoreFile,
    endRestoreFile,
    pluginIO,
    createFile,
    setFileAttributes,
    checkFile,
    NULL, /* handleXACLdata */
    NULL, /* checkStream */
};

VMB_EXPORT bRC loadPlugin(bInfo *binfo, bFuncs *funcs, pInfo **pinfo, pFuncs **pfuncs) {
    (void)binfo;
    bfuncs = funcs;
    *pinfo = &plugin_info;
    *pfuncs = &plugin_funcs;
    load_engine();
    return bRC_OK;
}

VMB_EXPORT bRC unloadPlugin(void) {
    /* The engine library stays mapped: its threads and destructors must not run against
     * unmapped code while the File Daemon exits. */
    return bRC_OK;
}
