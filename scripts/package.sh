#!/usr/bin/env bash
# Builds the packages: a release build, the man pages and shell completions generated from the
# CLI (`vm-backup generate-assets`), then target/debian/vm-backup_<version>_amd64.deb (cargo-deb)
# and target/generate-rpm/vm-backup-<version>-1.x86_64.rpm (cargo-generate-rpm). Installs the two
# cargo tools with `cargo install --locked` when missing. Prints the two package paths last.
# What goes where, and why: docs/packaging.md. Options: --deb-only, --rpm-only.
# SPDX-License-Identifier: AGPL-3.0-or-later
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

want_deb=1 want_rpm=1
for arg in "$@"; do
  case $arg in
    --deb-only) want_rpm=0;;
    --rpm-only) want_deb=0;;
    *) echo "package.sh: unknown option $arg" >&2; exit 2;;
  esac
done

say() { echo "package: $*" >&2; }

# The versions are pinned so that a fresh machine builds the same packages.
need_tool() { # cargo subcommand, crate, version
  if ! cargo "$1" --version >/dev/null 2>&1; then
    say "installing $2 $3 (cargo install --locked)"
    cargo install --locked --quiet "$2" --version "$3"
  fi
}
[ "$want_deb" = 1 ] && need_tool deb cargo-deb 3.8.0
[ "$want_rpm" = 1 ] && need_tool generate-rpm cargo-generate-rpm 0.21.1

say "release build"
cargo build --release --locked --bin vm-backup --lib
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
release=$target_dir/release
for f in vm-backup libvm_backup.so vm-backup-fd.so; do
  [ -f "$release/$f" ] || { say "missing $release/$f after the build"; exit 1; }
done

say "man pages and completions from the CLI"
assets=target/package-assets
rm -rf "$assets"
"$release/vm-backup" generate-assets --out "$assets" >/dev/null
gzip -9n "$assets"/man/*.1
[ -f "$assets/man/vm-backup-backup.1.gz" ] || { say "no vm-backup-backup.1"; exit 1; }

# Strip the shipped objects (the release profile keeps line tables for local profiling).
# cargo-deb strips target/release/vm-backup itself; the two .so files and the RPM need it here.
strip_copy() { strip --strip-unneeded -o "$1.stripped" "$1" && mv -f "$1.stripped" "$1"; }
for f in vm-backup libvm_backup.so vm-backup-fd.so; do strip_copy "$release/$f"; done

out=()
if [ "$want_deb" = 1 ]; then
  say "cargo deb"
  deb=$(cargo deb --no-build --locked --quiet)
  out+=("$deb")
fi
if [ "$want_rpm" = 1 ]; then
  say "cargo generate-rpm"
  cargo generate-rpm
  out+=("$(ls -t "$target_dir"/generate-rpm/vm-backup-*.rpm | head -1)")
fi
printf '%s\n' "${out[@]}"
