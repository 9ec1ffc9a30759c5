//! The plugin's restore options: what bconsole's `mod` → "Plugin Options" lets the operator
//! fill in at restore time (Bacula 9.6, unpatched File Daemon).
//!
//! At backup the plugin emits one restore object of type `FT_PLUGIN_CONFIG` named
//! [`RESTORE_OPTIONS_NAME`] whose body is [`serialized`]: the text of a Bacula `ConfigFile`
//! item table (`src/lib/ini.c`, `ConfigFile::serialize`: `OptPrompt="…"` then `name=@STR@`
//! per item). At restore the Director stores the filled values with the restore job as
//! `FT_PLUGIN_CONFIG_FILLED` (`ConfigFile::dump_results`: `name="value"` per item the operator
//! set) and the File Daemon hands them to the plugin as `bEventRestoreObject`; [`RestoreOptions::parse`]
//! reads them. Written by hand: the format is a handful of `key=value` lines in Bacula's own
//! quoting, and no crate reads Bacula's lexer format.

use super::PluginError;

/// The restore object's name (`INI_RESTORE_OBJECT_NAME` in Bacula's `ini.h`).
pub const RESTORE_OPTIONS_NAME: &str = "RestoreOptions";
/// Restore object type of the item table saved at backup (`FT_PLUGIN_CONFIG`).
pub const FT_PLUGIN_CONFIG: i32 = 27;
/// Restore object type of the values filled in at restore (`FT_PLUGIN_CONFIG_FILLED`).
pub const FT_PLUGIN_CONFIG_FILLED: i32 = 28;

/// The item table emitted at backup, in `ConfigFile::serialize`'s text format.
pub fn serialized() -> String {
    let items = [
        (
            "files",
            "Guest paths to extract into where (comma-separated); empty restores the VM",
        ),
        (
            "disk",
            "Disk the guest paths are on (default: the first disk)",
        ),
    ];
    let mut text = String::from("# Plugin configuration file\n# Version 1\n");
    for (name, prompt) in items {
        text.push_str(&format!("OptPrompt={}\n{name}=@STR@\n\n", quote(prompt)));
    }
    text
}

/// Bacula's `quote_string`: in double quotes, with `"` and `\` escaped.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Undoes [`quote`] (a bare value is taken as it is, trimmed).
fn unquote(v: &str) -> String {
    let v = v.trim();
    let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The values the operator filled in at restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Guest paths to extract instead of restoring the VM (empty: restore the VM).
    pub files: Vec<String>,
    /// The disk they are on (`None`: the first disk).
    pub disk: Option<String>,
}

impl RestoreOptions {
    /// Reads a filled `RestoreOptions` object (`ConfigFile::dump_results` text). Comments and
    /// blank lines are skipped; an unknown key is refused (the item table is the plugin's own).
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let mut opts = RestoreOptions::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(PluginError::BadRestoreOption(line.to_string()));
            };
            let key = key.trim();
            let value = unquote(value);
            // The unfilled table's type markers (`@STR@`) and prompts are not values.
            if value.starts_with('@') && value.ends_with('@') {
                continue;
            }
            match key.to_ascii_lowercase().as_str() {
                "optprompt" | "optdefault" | "optrequired" => {}
                "files" => {
                    opts.files = value
                        .split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect();
                }
                "disk" => {
                    let d = value.trim();
                    opts.disk = (!d.is_empty()).then(|| d.to_string());
                }
                _ => return Err(PluginError::BadRestoreOption(line.to_string())),
            }
        }
        Ok(opts)
    }

    /// Whether guest files are to be extracted (instead of restoring the VM).
    pub fn extracts_files(&self) -> bool {
        !self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_item_table_has_one_string_item_per_option() {
        let t = serialized();
        assert!(t.starts_with("# Plugin configuration file\n# Version 1\n"));
        assert!(t.contains("\nfiles=@STR@\n"));
        assert!(t.contains("\ndisk=@STR@\n"));
        assert_eq!(t.matches("OptPrompt=\"").count(), 2);
        // The unfilled table carries no value.
        assert_eq!(
            RestoreOptions::parse(&t).unwrap(),
            RestoreOptions::default()
        );
    }

    #[test]
    fn filled_values_are_read_with_bacula_quoting() {
        let t = "# Plugin configuration file\n# Version 1\nfiles=\"/etc/hostname, /mnt/data/a \\\"b\\\"\"\n\ndisk=\"vdb\"\n\n";
        let o = RestoreOptions::parse(t).unwrap();
        assert_eq!(o.files, vec!["/etc/hostname", "/mnt/data/a \"b\""]);
        assert_eq!(o.disk.as_deref(), Some("vdb"));
        assert!(o.extracts_files());
        let o = RestoreOptions::parse("files=\"\"\ndisk=\"\"\n").unwrap();
        assert!(!o.extracts_files());
        assert_eq!(o.disk, None);
    }

    #[test]
    fn unknown_keys_and_bare_lines_are_refused() {
        assert!(matches!(
            RestoreOptions::parse("file=/x\n"),
            Err(PluginError::BadRestoreOption(l)) if l == "file=/x"
        ));
        assert!(RestoreOptions::parse("files\n").is_err());
    }
}
