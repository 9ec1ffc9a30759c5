/*
 * vm-backup-fd.so: the Bacula 9.6 File Daemon plugin of vm-backup.
 *
 * This shim holds no backup logic and no constant of the engine's. It translates the File
 * Daemon's plugin events into calls of the engine's C ABI (include/vm_backup.h, the vmb_job_*
 * functions of libvm_backup.so) and the engine's job-log lines into JobMessage calls. Every
 * vmb_job_* call returns a vmb_status and an error message; every failure, the engine's or the
 * shim's own (a missing buffer, a seek, a packet of the wrong size), ends the job with an
 * M_FATAL message. Which commands and paths are the plugin's, and the plugin's version, date and
 * description, come from the engine (vmb_is_our_command, vmb_is_our_path, vmb_version,
 * vmb_plugin_date, vmb_plugin_description). FileSet syntax:
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
 * All state is per instance (ctx->pContext); the only globals are written once in loadPlugin,
 * and instance_lock: a cancel that races the end of its job (freePlugin on the job thread) takes
 * it to read the instance, and freePlugin takes it to detach the instance before freeing it, so
 * the cancel either reaches a live job or finds none (never a freed one).
 *
 * SPDX-License-Identifier: AGPL-3.0-or-later
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
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

/* Only the two entry points are exported (the shim is built with -fvisibility=hidden). */
#define VMB_EXPORT __attribute__((visibility("default")))

/* ---- the engine's functions, resolved with dlsym ------------------------------------------ */

struct vmb_api {
    __typeof__(&vmb_abi_version) abi_version;
    __typeof__(&vmb_version) version;
    __typeof__(&vmb_plugin_date) plugin_date;
    __typeof__(&vmb_plugin_description) plugin_description;
    __typeof__(&vmb_status_str) status_str;
    __typeof__(&vmb_string_free) string_free;
    __typeof__(&vmb_is_our_command) is_our_command;
    __typeof__(&vmb_is_our_path) is_our_path;
    __typeof__(&vmb_job_new) job_new;
    __typeof__(&vmb_job_free) job_free;
    __typeof__(&vmb_job_cancel) job_cancel;
    __typeof__(&vmb_job_start) job_start;
    __typeof__(&vmb_job_set_level) job_set_level;
    __typeof__(&vmb_job_set_since) job_set_since;
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
    __typeof__(&vmb_job_restore_object) job_restore_object;
};

/* Written once in loadPlugin (on the File Daemon's main thread), read-only afterwards. */
static bFuncs *bfuncs;
static struct vmb_api api;
static void *engine_handle;
static char load_error[1024];
/* Held only to read or detach ctx->pContext (never across a call into the engine that blocks):
 * orders bEventCancelCommand on the Director's thread against freePlugin on the job's. */
static pthread_mutex_t instance_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- per-job state ------------------------------------------------------------------------ */

struct instance {
    bpContext *ctx;
    VmbJob *job; /* NULL when the engine library could not be loaded */
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

/* Ends the job with a fatal message of the shim itself; returns bRC_Error. */
static bRC fatal(bpContext *ctx, const char *what) {
    if (bfuncs && bfuncs->JobMessage && ctx) {
        bfuncs->JobMessage(ctx, __FILE__, __LINE__, BFD_M_FATAL, 0, "vm-backup-fd: %s\n", what);
    }
    return bRC_Error;
}

/* The result of an engine call: bRC_OK, or the job ends with the engine's message (already
 * worded for the job log, "vm-backup: ...") as a fatal message and bRC_Error. Frees *error.
 * It takes `char **` so that *error is read after the call (argument order is unspecified). */
static bRC check(bpContext *ctx, vmb_status status, char **error) {
    char *text = *error;
    *error = NULL;
    if (status == VMB_OK) {
        if (text) api.string_free(text);
        return bRC_OK;
    }
    if (bfuncs && bfuncs->JobMessage && ctx) {
        bfuncs->JobMessage(ctx, __FILE__, __LINE__, BFD_M_FATAL, 0, "%s\n",
                           text ? text : api.status_str(status));
    }
    if (text) api.string_free(text);
    return bRC_Error;
}

/* Fails the current job when the engine is missing; returns the instance otherwise. */
static struct instance *engine_or_fail(bpContext *ctx) {
    struct instance *in = inst(ctx);
    if (!in) {
        fatal(ctx, "no plugin instance (internal error)");
        return NULL;
    }
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
    SYM(abi_version, vmb_abi_version);
    if (api.abi_version() != VMB_ABI_VERSION) {
        snprintf(load_error, sizeof load_error,
                 "the engine library has C ABI version %u, this plugin was built for %u",
                 (unsigned)api.abi_version(), (unsigned)VMB_ABI_VERSION);
        return 0;
    }
    SYM(version, vmb_version);
    SYM(plugin_date, vmb_plugin_date);
    SYM(plugin_description, vmb_plugin_description);
    SYM(status_str, vmb_status_str);
    SYM(string_free, vmb_string_free);
    SYM(is_our_command, vmb_is_our_command);
    SYM(is_our_path, vmb_is_our_path);
    SYM(job_new, vmb_job_new);
    SYM(job_free, vmb_job_free);
    SYM(job_cancel, vmb_job_cancel);
    SYM(job_start, vmb_job_start);
    SYM(job_set_level, vmb_job_set_level);
    SYM(job_set_since, vmb_job_set_since);
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
    SYM(job_restore_object, vmb_job_restore_object);
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
        memset(&api, 0, sizeof api);
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
    if (!in) return fatal(ctx, "out of memory");
    in->ctx = ctx;
    ctx->pContext = in;
    if (engine_handle) {
        VmbJobCallbacks cb = {.opaque = ctx, .message = on_message};
        char *err = NULL;
        return check(ctx, api.job_new(&cb, &in->job, &err), &err);
    }
    return bRC_OK;
}

static bRC freePlugin(bpContext *ctx) {
    if (!ctx) return bRC_OK;
    /* Detached first, under the lock the cancel path reads it with: a cancel arriving from now
     * on finds no instance. The job itself cancels a backup still running when it is freed. */
    pthread_mutex_lock(&instance_lock);
    struct instance *in = inst(ctx);
    ctx->pContext = NULL;
    pthread_mutex_unlock(&instance_lock);
    if (!in) return bRC_OK;
    if (in->job) api.job_free(in->job); /* releases everything the job still holds */
    free(in);
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

/* Whether a plugin string is ours: the engine's rule. Without the engine every command the File
 * Daemon routes here (it routes by the plugin's name) is taken as ours, so that the job fails
 * with the reason the engine is missing. */
static int is_ours(const char *cmd) {
    return cmd && (!engine_handle || api.is_our_command(cmd));
}

static bRC command(bpContext *ctx, enum VmbCommand kind, const char *cmd) {
    struct instance *in = inst(ctx);
    if (!in || !is_ours(cmd)) return bRC_OK;
    if (!engine_or_fail(ctx)) return bRC_Error;
    char *err = NULL;
    return check(ctx, api.job_command(in->job, kind, cmd, &err), &err);
}

/* bEventCancelCommand: from the Director connection thread, where no job message may be sent;
 * it only sets a flag and cannot fail for a live job, which then ends as canceled. The instance
 * is read under the lock: freePlugin may be freeing it on the job thread at this moment. */
static bRC cancel_job(bpContext *ctx) {
    pthread_mutex_lock(&instance_lock);
    struct instance *in = inst(ctx);
    if (in && in->job) (void)api.job_cancel(in->job, NULL);
    pthread_mutex_unlock(&instance_lock);
    return bRC_OK;
}

static bRC handlePluginEvent(bpContext *ctx, bEvent *event, void *value) {
    if (event && event->eventType == bEventCancelCommand) return cancel_job(ctx);
    struct instance *in = inst(ctx);
    char *err = NULL;
    if (!in || !event) return bRC_OK;
    switch (event->eventType) {
    case bEventJobStart:
        if (!in->job) return bRC_OK;
        return check(ctx, api.job_start(in->job, (const char *)value, &err), &err);
    case bEventLevel:
        if (!in->job) return bRC_OK;
        return check(ctx, api.job_set_level(in->job, (int)(intptr_t)value, &err), &err);
    case bEventSince:
        if (!in->job) return bRC_OK;
        return check(ctx, api.job_set_since(in->job, (int64_t)(intptr_t)value, &err), &err);
    case bEventPluginCommand:
        return command(ctx, VMB_COMMAND_CHECK, (const char *)value);
    case bEventBackupCommand:
        return command(ctx, VMB_COMMAND_BACKUP, (const char *)value);
    case bEventEstimateCommand:
        return command(ctx, VMB_COMMAND_ESTIMATE, (const char *)value);
    case bEventRestoreCommand: {
        const char *cmd = (const char *)value;
        if (!is_ours(cmd)) return bRC_OK;
        if (!engine_or_fail(ctx)) return bRC_Error;
        char *where = NULL;
        int replace = 'a';
        if (bfuncs->getBaculaValue(ctx, bVarWhere, &where) != bRC_OK) where = NULL;
        if (bfuncs->getBaculaValue(ctx, bVarReplace, &replace) != bRC_OK) replace = 'a';
        return check(ctx, api.job_restore_command(in->job, cmd, where ? where : "", replace, &err),
                     &err);
    }
    case bEventRestoreObject: {
        /* Before the streams; NULL after the last object. The engine keeps its own filled
         * restore options and ignores every other object. */
        struct restore_object_pkt *rop = (struct restore_object_pkt *)value;
        if (!rop || !in->job) return bRC_OK;
        if (!packet_ok(ctx, rop->pkt_size, sizeof *rop, "restore_object_pkt")) return bRC_Error;
        if (!rop->object_name || rop->object_len < 0) return bRC_OK;
        return check(ctx, api.job_restore_object(in->job, rop->object_name, rop->object_type,
                                                 rop->object, (size_t)rop->object_len, &err),
                     &err);
    }
    default:
        return bRC_OK;
    }
}

static bRC startBackupFile(bpContext *ctx, struct save_pkt *sp) {
    struct instance *in = engine_or_fail(ctx);
    if (!in) return bRC_Error;
    if (!sp) return fatal(ctx, "startBackupFile without a save packet");
    if (!packet_ok(ctx, sp->pkt_size, sizeof *sp, "save_pkt")) return bRC_Error;
    VmbFileInfo f;
    bool found = false;
    char *err = NULL;
    memset(&f, 0, sizeof f);
    if (check(ctx, api.job_next_file(in->job, &f, &found, &err), &err) != bRC_OK) return bRC_Error;
    if (!found) return fatal(ctx, "no file to save (internal error)");
    memset(&sp->statp, 0, sizeof sp->statp);
    sp->fname = (char *)f.path;
    sp->link = NULL;
    sp->statp.st_nlink = 1;
    sp->statp.st_size = (off_t)f.size;
    sp->statp.st_blksize = 65536;
    sp->statp.st_blocks = (blkcnt_t)((f.size + 511) / 512);
    sp->statp.st_mtime = sp->statp.st_atime = sp->statp.st_ctime = (time_t)f.mtime;
    if (f.kind == VMB_FILE_KIND_RESTORE_OPTIONS) {
        /* A restore object: the File Daemon catalogs it with the job (no data, no stat). */
        sp->type = BFD_FT_PLUGIN_CONFIG;
        sp->object_name = (char *)f.path;
        sp->object = (char *)f.object;
        sp->object_len = (int32_t)f.object_len;
        sp->index = 1;
        sp->no_read = true;
        return bRC_OK;
    }
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
    bool more = false;
    char *err = NULL;
    if (check(ctx, api.job_end_file(in->job, &more, &err), &err) != bRC_OK) return bRC_Error;
    return more ? bRC_More : bRC_OK;
}

static bRC startRestoreFile(bpContext *ctx, const char *cmd) {
    (void)cmd;
    return engine_or_fail(ctx) ? bRC_OK : bRC_Error;
}

static bRC endRestoreFile(bpContext *ctx) {
    struct instance *in = engine_or_fail(ctx);
    if (!in) return bRC_Error;
    char *err = NULL;
    return check(ctx, api.job_end_restore_file(in->job, &err), &err);
}

/* pluginIO failed: the packet says so and the job ends with the message already sent. */
static bRC io_failed(struct io_pkt *io, int error_number) {
    io->status = -1;
    io->io_errno = error_number;
    return bRC_Error;
}

static bRC pluginIO(bpContext *ctx, struct io_pkt *io) {
    struct instance *in = engine_or_fail(ctx);
    if (!in) {
        if (io) io->status = -1, io->io_errno = EIO;
        return bRC_Error;
    }
    if (!io) return fatal(ctx, "pluginIO without an I/O packet");
    if (!packet_ok(ctx, io->pkt_size, sizeof *io, "io_pkt")) return io_failed(io, EINVAL);
    io->status = 0;
    io->io_errno = 0;
    io->lerror = 0;
    char *err = NULL;
    size_t n = 0;
    switch (io->func) {
    case BFD_IO_OPEN:
        if (check(ctx, api.job_open(in->job, (io->flags & (O_WRONLY | O_RDWR)) != 0, &err), &err)
            != bRC_OK)
            return io_failed(io, EIO);
        return bRC_OK;
    case BFD_IO_READ:
        if (!io->buf || io->count < 0) {
            fatal(ctx, "pluginIO read without a buffer or with a negative count");
            return io_failed(io, EINVAL);
        }
        if (check(ctx, api.job_read(in->job, (uint8_t *)io->buf, (size_t)io->count, &n, &err), &err)
            != bRC_OK)
            return io_failed(io, EIO);
        io->status = (int32_t)n;
        return bRC_OK;
    case BFD_IO_WRITE:
        if (!io->buf || io->count < 0) {
            fatal(ctx, "pluginIO write without a buffer or with a negative count");
            return io_failed(io, EINVAL);
        }
        if (check(ctx, api.job_write(in->job, (const uint8_t *)io->buf, (size_t)io->count, &err),
                  &err) != bRC_OK)
            return io_failed(io, EIO);
        io->status = io->count;
        return bRC_OK;
    case BFD_IO_CLOSE:
        if (check(ctx, api.job_close(in->job, &err), &err) != bRC_OK) return io_failed(io, EIO);
        return bRC_OK;
    default: /* SEEK: the plugin's files are sequential */
        fatal(ctx, "pluginIO seek is not supported: the plugin's files are read in order");
        return io_failed(io, ESPIPE);
    }
}

static bRC createFile(bpContext *ctx, struct restore_pkt *rp) {
    struct instance *in = engine_or_fail(ctx);
    if (!in) {
        if (rp) rp->create_status = BFD_CF_ERROR;
        return bRC_Error;
    }
    if (!rp) return fatal(ctx, "createFile without a restore packet");
    if (!packet_ok(ctx, rp->pkt_size, sizeof *rp, "restore_pkt")) {
        rp->create_status = BFD_CF_ERROR;
        return bRC_Error;
    }
    enum VmbCreate what = VMB_CREATE_SKIP;
    char *err = NULL;
    if (check(ctx, api.job_create_file(in->job, rp->ofname, rp->where ? rp->where : "",
                                       rp->replace, &what, &err), &err) != bRC_OK) {
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
    return engine_handle && api.is_our_path(fname) ? bRC_Seen : bRC_OK;
}

/* ---- registration ------------------------------------------------------------------------- */

/* The version, date and description are the engine's (filled in loadPlugin); without the
 * engine, the description says why it is missing. */
static pInfo plugin_info = {
    sizeof(pInfo),
    BFD_INTERFACE_VERSION,
    BFD_PLUGIN_MAGIC,
    "AGPLv3",
    "vm-backup authors",
    "",
    "unknown",
    "the engine library is not loaded",
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
    load_engine();
    if (engine_handle) {
        plugin_info.plugin_date = api.plugin_date();
        plugin_info.plugin_version = api.version();
        plugin_info.plugin_description = api.plugin_description();
    } else if (load_error[0]) {
        plugin_info.plugin_description = load_error;
    }
    *pinfo = &plugin_info;
    *pfuncs = &plugin_funcs;
    return bRC_OK;
}

VMB_EXPORT bRC unloadPlugin(void) {
    /* The engine library stays mapped: its threads and destructors must not run against
     * unmapped code while the File Daemon exits. */
    return bRC_OK;
}
