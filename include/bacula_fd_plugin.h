/*
 * bacula_fd_plugin.h: the project's own C declarations of the Bacula 9.6 File Daemon plugin
 * interface (FD_PLUGIN_INTERFACE_VERSION 14, x86_64 LP64).
 *
 * Written from the interface facts recorded in /work/shared/notes/bacula.md (§5), which were
 * measured against Bacula 9.6.7: event and variable numbers, structure field order, sizes and
 * offsets. Bacula's own header cannot be compiled as C (it is C++ only and needs autoconf's
 * config.h) and is not used or copied here. The sizes are asserted at compile time below and the
 * shim also checks every packet's pkt_size at run time.
 *
 * SPDX-License-Identifier: AGPL-3.0-or-later
 */
#ifndef VMB_BACULA_FD_PLUGIN_H
#define VMB_BACULA_FD_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

/* ---- versions and identity ---------------------------------------------------------------- */

/** The interface version the 9.6 File Daemon requires in pInfo.version. */
#define BFD_INTERFACE_VERSION 14
/** The magic string the File Daemon requires in pInfo.plugin_magic. */
#define BFD_PLUGIN_MAGIC "*FDPluginData*"

/* ---- return codes (bRC) ------------------------------------------------------------------- */

typedef enum {
    bRC_OK = 0,
    bRC_Stop = 1,
    bRC_Error = 2,
    bRC_More = 3,
    bRC_Term = 4,
    bRC_Seen = 5,
    bRC_Core = 6,
    bRC_Skip = 7,
    bRC_Cancel = 8,
    bRC_Max = 9999
} bRC;

/* ---- job message types -------------------------------------------------------------------- */

enum {
    BFD_M_ABORT = 1,
    BFD_M_DEBUG = 2,
    BFD_M_FATAL = 3,
    BFD_M_ERROR = 4,
    BFD_M_WARNING = 5,
    BFD_M_INFO = 6,
    BFD_M_SAVED = 7,
    BFD_M_NOTSAVED = 8,
    BFD_M_SKIPPED = 9,
    BFD_M_MOUNT = 10,
    BFD_M_ERROR_TERM = 11,
    BFD_M_TERM = 12,
    BFD_M_RESTORED = 13,
    BFD_M_SECURITY = 14,
    BFD_M_ALERT = 15,
    BFD_M_VOLMGMT = 16
};

/* ---- file types (the few a plugin uses) and createFile results ---------------------------- */

enum {
    BFD_FT_REGE = 2,     /* empty regular file */
    BFD_FT_REG = 3,      /* regular file */
    BFD_FT_LNK = 4,      /* symbolic link */
    BFD_FT_DIREND = 5,   /* directory, sent after its contents */
    BFD_FT_RESTORE_FIRST = 25,
    BFD_FT_PLUGIN_CONFIG = 27,
    BFD_FT_PLUGIN_CONFIG_FILLED = 28
};

enum {
    BFD_CF_SKIP = 1,
    BFD_CF_ERROR = 2,
    BFD_CF_EXTRACT = 3,
    BFD_CF_CREATED = 4,
    BFD_CF_CORE = 5
};

/* io_pkt.func */
enum { BFD_IO_OPEN = 1, BFD_IO_READ = 2, BFD_IO_WRITE = 3, BFD_IO_CLOSE = 4, BFD_IO_SEEK = 5 };

/* save_pkt.flags bits the File Daemon honours */
#define BFD_FO_SPARSE (1u << 5)
#define BFD_FO_PORTABLE (1u << 10)

/* ---- events ------------------------------------------------------------------------------- */

typedef enum {
    bEventJobStart = 1,
    bEventJobEnd = 2,
    bEventStartBackupJob = 3,
    bEventEndBackupJob = 4,
    bEventStartRestoreJob = 5,
    bEventEndRestoreJob = 6,
    bEventStartVerifyJob = 7,
    bEventEndVerifyJob = 8,
    bEventBackupCommand = 9,
    bEventRestoreCommand = 10,
    bEventEstimateCommand = 11,
    bEventLevel = 12,
    bEventSince = 13,
    bEventCancelCommand = 14,
    bEventVssBackupAddComponents = 15,
    bEventVssRestoreLoadComponentMetadata = 16,
    bEventVssRestoreSetComponentsSelected = 17,
    bEventRestoreObject = 18,
    bEventEndFileSet = 19,
    bEventPluginCommand = 20,
    bEventVssBeforeCloseRestore = 21,
    bEventVssPrepareSnapshot = 22,
    bEventOptionPlugin = 23,
    bEventHandleBackupFile = 24,
    bEventComponentInfo = 25,
    bEventFeatures = 26
} bEventType;

typedef struct {
    uint32_t eventType;
} bEvent;

/* ---- variables readable through getBaculaValue -------------------------------------------- */

typedef enum {
    bVarJobId = 1,        /* int */
    bVarFDName = 2,       /* char* */
    bVarLevel = 3,        /* int holding the level char */
    bVarType = 4,         /* int holding the type char */
    bVarClient = 5,       /* char* */
    bVarJobName = 6,      /* char*, the unique job name */
    bVarJobStatus = 7,    /* int holding the status char */
    bVarSinceTime = 8,    /* int (32 bit) */
    bVarAccurate = 9,     /* int */
    bVarFileSeen = 10,
    bVarVssObject = 11,
    bVarVssDllHandle = 12,
    bVarWorkingDir = 13,  /* char* */
    bVarWhere = 14,       /* char* */
    bVarRegexWhere = 15,  /* char* */
    bVarExePath = 16,     /* char* */
    bVarVersion = 17,     /* char* */
    bVarDistName = 18,    /* char* */
    bVarxxx = 19,
    bVarPrevJobName = 20, /* char* */
    bVarPrefixLinks = 21, /* int */
    bVarInteractiveSession = 22,
    bVarFileIndex = 23,   /* int */
    bVarReplace = 24      /* int holding the replace char ('a' always, 'w' ifnewer, 'o' ifolder, 'n' never) */
} bVariable;

typedef enum { pVarName = 1, pVarDescription = 2 } pVariable;

/* ---- the context shared by the File Daemon and one plugin instance (one per job) ---------- */

typedef struct {
    void *bContext; /* the File Daemon's */
    void *pContext; /* the plugin's per-job state */
} bpContext;

/* ---- packets ------------------------------------------------------------------------------ */

/** startBackupFile: the plugin describes the next file to save (240 bytes). */
struct save_pkt {
    int32_t pkt_size;
    char *fname;
    char *link;
    struct stat statp;
    int32_t type;
    uint64_t flags;
    bool no_read;
    bool portable;
    bool accurate_found;
    char *cmd;
    uint32_t delta_seq;
    char *object_name;
    char *object;
    int32_t object_len;
    int32_t index;
    int32_t LinkFI;
    int32_t pkt_end;
};

/** createFile / setFileAttributes: a file being restored (232 bytes). */
struct restore_pkt {
    int32_t pkt_size;
    int32_t stream;
    int32_t data_stream;
    int32_t type;
    int32_t file_index;
    int32_t LinkFI;
    uid_t uid;
    struct stat statp;
    const char *attrEx;
    const char *ofname;
    const char *olname;
    const char *where;
    const char *RegexWhere;
    int replace;
    int create_status;
    uint32_t delta_seq;
    int32_t pkt_end;
};

/** pluginIO: open/read/write/close/seek of the current file (72 bytes). */
struct io_pkt {
    int32_t pkt_size;
    int32_t func;
    int32_t count;
    int32_t flags;
    mode_t mode;
    char *buf;
    const char *fname;
    int32_t status;
    int32_t io_errno;
    int32_t lerror;
    int32_t whence;
    int64_t offset; /* boffset_t */
    bool win32;
    int32_t pkt_end;
};

/** handleXACLdata (unused by this plugin; the entry point may be NULL). */
struct xacl_pkt {
    int32_t pkt_size;
    int32_t func;
    int32_t count;
    char *content;
    int32_t pkt_end;
};

/** bEventRestoreObject: one restore object of the job being restored (64 bytes); the event's
 * value is NULL after the last one. */
struct restore_object_pkt {
    int32_t pkt_size;
    char *object_name;
    char *object;
    char *plugin_name;
    int32_t object_type; /* BFD_FT_* */
    int32_t object_len;
    int32_t object_full_len;
    int32_t object_index;
    int32_t object_compression;
    int32_t stream;
    uint32_t JobId;
    int32_t pkt_end;
};

/** checkStream (unused by this plugin; the entry point may be NULL). */
struct stream_pkt {
    int32_t pkt_size;
    int32_t stream;
    int32_t pkt_end;
};

/* ---- what the File Daemon passes to loadPlugin -------------------------------------------- */

typedef struct {
    uint32_t size;
    uint32_t version;
} bInfo;

typedef struct {
    uint32_t size;
    uint32_t version;
    bRC (*registerBaculaEvents)(bpContext *ctx, ...);
    bRC (*getBaculaValue)(bpContext *ctx, bVariable var, void *value);
    bRC (*setBaculaValue)(bpContext *ctx, bVariable var, void *value);
    bRC (*JobMessage)(bpContext *ctx, const char *file, int line, int type, int64_t mtime,
                      const char *fmt, ...);
    bRC (*DebugMessage)(bpContext *ctx, const char *file, int line, int level, const char *fmt,
                        ...);
    void *(*baculaMalloc)(bpContext *ctx, const char *file, int line, size_t size);
    void (*baculaFree)(bpContext *ctx, const char *file, int line, void *mem);
    bRC (*AddExclude)(bpContext *ctx, const char *file);
    bRC (*AddInclude)(bpContext *ctx, const char *file);
    bRC (*AddOptions)(bpContext *ctx, const char *opts);
    bRC (*AddRegex)(bpContext *ctx, const char *item, int type);
    bRC (*AddWild)(bpContext *ctx, const char *item, int type);
    bRC (*NewOptions)(bpContext *ctx);
    bRC (*NewInclude)(bpContext *ctx);
    bRC (*NewPreInclude)(bpContext *ctx);
    bRC (*checkChanges)(bpContext *ctx, struct save_pkt *sp);
    bRC (*AcceptFile)(bpContext *ctx, struct save_pkt *sp);
} bFuncs;

/* ---- what the plugin gives back ----------------------------------------------------------- */

typedef struct {
    uint32_t size;
    uint32_t version;
    const char *plugin_magic;
    const char *plugin_license;
    const char *plugin_author;
    const char *plugin_date;
    const char *plugin_version;
    const char *plugin_description;
} pInfo;

typedef struct {
    uint32_t size;
    uint32_t version;
    bRC (*newPlugin)(bpContext *ctx);
    bRC (*freePlugin)(bpContext *ctx);
    bRC (*getPluginValue)(bpContext *ctx, pVariable var, void *value);
    bRC (*setPluginValue)(bpContext *ctx, pVariable var, void *value);
    bRC (*handlePluginEvent)(bpContext *ctx, bEvent *event, void *value);
    bRC (*startBackupFile)(bpContext *ctx, struct save_pkt *sp);
    bRC (*endBackupFile)(bpContext *ctx);
    bRC (*startRestoreFile)(bpContext *ctx, const char *cmd);
    bRC (*endRestoreFile)(bpContext *ctx);
    bRC (*pluginIO)(bpContext *ctx, struct io_pkt *io);
    bRC (*createFile)(bpContext *ctx, struct restore_pkt *rp);
    bRC (*setFileAttributes)(bpContext *ctx, struct restore_pkt *rp);
    bRC (*checkFile)(bpContext *ctx, char *fname);
    bRC (*handleXACLdata)(bpContext *ctx, struct xacl_pkt *xacl);
    bRC (*checkStream)(bpContext *ctx, struct stream_pkt *sp);
} pFuncs;

/* ---- entry points the File Daemon looks up with dlsym ------------------------------------- */

bRC loadPlugin(bInfo *binfo, bFuncs *bfuncs, pInfo **pinfo, pFuncs **pfuncs);
bRC unloadPlugin(void);

/* ---- layout checks against the sizes measured on the 9.6.7 File Daemon -------------------- */

_Static_assert(sizeof(bpContext) == 16, "bpContext is 16 bytes");
_Static_assert(sizeof(bInfo) == 8, "bInfo is 8 bytes");
_Static_assert(sizeof(bFuncs) == 144, "bFuncs is 144 bytes");
_Static_assert(sizeof(pInfo) == 56, "pInfo is 56 bytes");
_Static_assert(sizeof(pFuncs) == 128, "pFuncs is 128 bytes");
_Static_assert(sizeof(struct save_pkt) == 240, "save_pkt is 240 bytes");
_Static_assert(sizeof(struct restore_object_pkt) == 64, "restore_object_pkt is 64 bytes");
_Static_assert(offsetof(struct save_pkt, statp) == 24, "save_pkt.statp at 24");
_Static_assert(offsetof(struct save_pkt, type) == 168, "save_pkt.type at 168");
_Static_assert(offsetof(struct save_pkt, flags) == 176, "save_pkt.flags at 176");
_Static_assert(offsetof(struct save_pkt, no_read) == 184, "save_pkt.no_read at 184");
_Static_assert(offsetof(struct save_pkt, cmd) == 192, "save_pkt.cmd at 192");
_Static_assert(offsetof(struct save_pkt, pkt_end) == 236, "save_pkt.pkt_end at 236");
_Static_assert(sizeof(struct restore_pkt) == 232, "restore_pkt is 232 bytes");
_Static_assert(offsetof(struct restore_pkt, statp) == 32, "restore_pkt.statp at 32");
_Static_assert(offsetof(struct restore_pkt, ofname) == 184, "restore_pkt.ofname at 184");
_Static_assert(offsetof(struct restore_pkt, where) == 200, "restore_pkt.where at 200");
_Static_assert(offsetof(struct restore_pkt, replace) == 216, "restore_pkt.replace at 216");
_Static_assert(offsetof(struct restore_pkt, create_status) == 220, "create_status at 220");
_Static_assert(offsetof(struct restore_pkt, pkt_end) == 228, "restore_pkt.pkt_end at 228");
_Static_assert(sizeof(struct io_pkt) == 72, "io_pkt is 72 bytes");
_Static_assert(offsetof(struct io_pkt, buf) == 24, "io_pkt.buf at 24");
_Static_assert(offsetof(struct io_pkt, status) == 40, "io_pkt.status at 40");
_Static_assert(offsetof(struct io_pkt, offset) == 56, "io_pkt.offset at 56");
_Static_assert(offsetof(struct io_pkt, pkt_end) == 68, "io_pkt.pkt_end at 68");

#endif /* VMB_BACULA_FD_PLUGIN_H */
