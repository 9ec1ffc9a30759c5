#ifndef VM_BACKUP_H
#define VM_BACKUP_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/**
 * Default size of one I/O buffer.
 */
#define DEFAULT_BUFFER_SIZE (1 << 20)

/**
 * Default number of buffers in flight.
 */
#define DEFAULT_QUEUE_DEPTH 16

/**
 * Default size of one hashed chunk, recorded in the manifest.
 */
#define DEFAULT_CHUNK_SIZE (4 << 20)

/**
 * The schema version written by this build.
 */
#define SCHEMA_VERSION 1

/**
 * Which plugin command of the File Daemon is being forwarded.
 */
typedef enum VmbCommand {
  /**
   * bEventPluginCommand (FileSet transfer): check the string only.
   */
  VMB_COMMAND_CHECK = 0,
  /**
   * bEventBackupCommand: run or prepare the backup.
   */
  VMB_COMMAND_BACKUP = 1,
  /**
   * bEventEstimateCommand: list the files, touch nothing.
   */
  VMB_COMMAND_ESTIMATE = 2,
} VmbCommand;

/**
 * What to do with a file being restored.
 */
typedef enum VmbCreate {
  /**
   * Data follows (CF_EXTRACT).
   */
  VMB_CREATE_EXTRACT = 0,
  /**
   * Nothing to write; done (CF_CREATED).
   */
  VMB_CREATE_CREATED = 1,
  /**
   * Skip it (CF_SKIP).
   */
  VMB_CREATE_SKIP = 2,
} VmbCreate;

/**
 * A regular file or a folder.
 */
typedef enum VmbFileKind {
  /**
   * Regular file (FT_REG).
   */
  VMB_FILE_KIND_REGULAR = 0,
  /**
   * Folder (FT_DIREND); no data.
   */
  VMB_FILE_KIND_DIRECTORY = 1,
} VmbFileKind;

/**
 * Severity of a job-log line; the shim maps it onto Bacula's M_INFO, M_WARNING, M_ERROR, M_FATAL.
 */
typedef enum VmbMessageLevel {
  /**
   * Progress and events (M_INFO).
   */
  VMB_MESSAGE_LEVEL_INFO = 0,
  /**
   * Worth a look; the job still ends OK (M_WARNING).
   */
  VMB_MESSAGE_LEVEL_WARNING = 1,
  /**
   * Counted in JobErrors: the job ends "OK -- with warnings" (M_ERROR).
   */
  VMB_MESSAGE_LEVEL_ERROR = 2,
  /**
   * The job fails (M_FATAL).
   */
  VMB_MESSAGE_LEVEL_FATAL = 3,
} VmbMessageLevel;

/**
 * One plugin instance: the state of one Bacula job. Opaque to C.
 */
typedef struct VmbJob VmbJob;

/**
 * The message callback: `text` is a NUL-terminated UTF-8 line without a trailing newline,
 * valid only during the call.
 */
typedef void (*VmbMessageFn)(void *opaque, enum VmbMessageLevel level, const char *text);

/**
 * What the driver gives a new job: where its messages go.
 */
typedef struct VmbJobCallbacks {
  /**
   * Passed back unchanged to `message` (the shim passes its Bacula context).
   */
  void *opaque;
  /**
   * Receives job-log lines; may be NULL to drop them.
   */
  VmbMessageFn message;
} VmbJobCallbacks;

/**
 * The next file to save, filled by [`vmb_job_next_file`].
 */
typedef struct VmbFileInfo {
  /**
   * The cataloged path; valid until the next `vmb_job_next_file` or `vmb_job_free`.
   */
  const char *path;
  /**
   * Regular file or folder.
   */
  enum VmbFileKind kind;
  /**
   * Permission bits (no file type bits).
   */
  uint32_t mode;
  /**
   * Size in bytes.
   */
  uint64_t size;
  /**
   * Modification time, Unix seconds.
   */
  int64_t mtime;
  /**
   * True when no data is to be read (folders, estimates).
   */
  bool no_read;
} VmbFileInfo;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Creates the state of one job. Cheap, no side effects (the File Daemon creates a plugin
 * instance for every job and console command). Returns NULL only if `callbacks` is NULL.
 *
 * # Safety
 * `callbacks` must point to a valid [`VmbJobCallbacks`]; its `opaque` must stay valid until
 * [`vmb_job_free`].
 */
struct VmbJob *vmb_job_new(const struct VmbJobCallbacks *callbacks);

/**
 * Frees a job. Whatever it still holds is released here: a stream-mode snapshot is committed,
 * a partial restore folder removed. Accepts NULL.
 *
 * # Safety
 * `job` must be NULL or come from [`vmb_job_new`], and not be used afterwards.
 */
void vmb_job_free(struct VmbJob *job);

/**
 * Requests cancellation; the engine stops at its next check and releases everything. Safe
 * from any thread.
 *
 * # Safety
 * `job` must be NULL or a live job from [`vmb_job_new`].
 */
void vmb_job_cancel(const struct VmbJob *job);

/**
 * Event JobStart: `description` is `"JobId=N Job=<unique name>"`.
 *
 * # Safety
 * `job` from [`vmb_job_new`]; `description` NULL or NUL-terminated.
 */
int vmb_job_start(struct VmbJob *job, const char *description);

/**
 * Event Level: the level letter (`'F'`, `'I'`, `'D'`…).
 *
 * # Safety
 * `job` from [`vmb_job_new`].
 */
int vmb_job_set_level(struct VmbJob *job, int level);

/**
 * Event Since: the time of the previous backup, Unix seconds.
 *
 * # Safety
 * `job` from [`vmb_job_new`].
 */
int vmb_job_set_since(struct VmbJob *job, int64_t since);

/**
 * Whether `cmd` is addressed to this plugin (`vm-backup:` prefix).
 *
 * # Safety
 * `cmd` NULL or NUL-terminated.
 */
bool vmb_is_our_command(const char *cmd);

/**
 * Events PluginCommand, BackupCommand, EstimateCommand. Backup runs the whole direct-mode
 * backup (or prepares the stream-mode session) before returning; progress goes to the job log.
 *
 * # Safety
 * `job` from [`vmb_job_new`]; `cmd` NULL or NUL-terminated.
 */
int vmb_job_command(struct VmbJob *job, enum VmbCommand kind, const char *cmd);

/**
 * startBackupFile: fills `out` with the next file. Returns 1 when a file was filled, 0 when
 * there is none, -1 on failure.
 *
 * # Safety
 * `job` from [`vmb_job_new`]; `out` valid for writing.
 */
int vmb_job_next_file(struct VmbJob *job, struct VmbFileInfo *out);

/**
 * endBackupFile: 1 when more files follow, 0 when done, -1 on failure.
 *
 * # Safety
 * `job` from [`vmb_job_new`].
 */
int vmb_job_end_file(struct VmbJob *job);

/**
 * pluginIO OPEN of the current file: for reading on backup, for writing on restore.
 *
 * # Safety
 * `job` from [`vmb_job_new`].
 */
int vmb_job_open(struct VmbJob *job, bool for_write);

/**
 * pluginIO READ: up to `len` bytes into `buf`. Returns the count, 0 at the end, -1 on failure
 * (also once canceled).
 *
 * # Safety
 * `job` from [`vmb_job_new`]; `buf` valid for `len` bytes of writing.
 */
int64_t vmb_job_read(struct VmbJob *job, uint8_t *buf, size_t len);

/**
 * pluginIO WRITE: `len` bytes from `buf`. Returns `len`, or -1 on failure.
 *
 * # Safety
 * `job` from [`vmb_job_new`]; `buf` valid for `len` bytes of reading.
 */
int64_t vmb_job_write(struct VmbJob *job, const uint8_t *buf, size_t len);

/**
 * pluginIO CLOSE.
 *
 * # Safety
 * `job` from [`vmb_job_new`].
 */
int vmb_job_close(struct VmbJob *job);

/**
 * Event RestoreCommand (before every restored file): the plugin string saved at backup time,
 * the restore's `where` and its `replace` letter (`'a'` always, `'n'` never…).
 *
 * # Safety
 * `job` from [`vmb_job_new`]; strings NULL or NUL-terminated.
 */
int vmb_job_restore_command(struct VmbJob *job, const char *cmd, const char *where_, int replace);

/**
 * createFile: `ofname` is the name the File Daemon would write (`where` + cataloged path).
 * Fills `out`; returns 0, or -1 on failure.
 *
 * # Safety
 * `job` from [`vmb_job_new`]; strings NULL or NUL-terminated; `out` valid for writing.
 */
int vmb_job_create_file(struct VmbJob *job,
                        const char *ofname,
                        const char *where_,
                        int replace,
                        enum VmbCreate *out);

/**
 * endRestoreFile: after the last file of a backup (its metadata), restores the VM.
 *
 * # Safety
 * `job` from [`vmb_job_new`].
 */
int vmb_job_end_restore_file(struct VmbJob *job);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* VM_BACKUP_H */
