#!/usr/bin/env bash
# The proof that a third party can embed slacker: a crate OUTSIDE the workspace
# (tests/outside-consumer, copied to a temporary directory) implements `Backend` over a
# HashMap with `slacker-core` at `default-features = false` and runs
# `slacker_testkit::conformance_suite!` on it, depending on the `.crate` files that
# `cargo package` made, not on paths.
#
#   bash .ci/outside-consumer.sh
#
# The packaged slacker crates and their third-party dependencies (vendored from
# crates.io, the only network access) form a local directory registry that replaces
# crates.io for the consumer, which then builds and tests --offline. It also checks that
# the consumer's normal dependency tree carries none of the default features' crates.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
log() { printf '[outside-consumer] %s\n' "$*" >&2; }

(cd tests/outside-consumer && cargo fmt -- --check) # not covered by `cargo fmt --all`

CRATES=(slacker-core slacker-backend-mem slacker-testkit)
VERSION=$(cargo pkgid -p slacker-core | sed 's/.*[@#]//')

WORK=$(mktemp -d "${TMPDIR:-/tmp}/slacker-outside.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
REG=$WORK/registry
mkdir -p "$REG" "$WORK/thirdparty"

# 1. The .crate files, exactly as they would be published (--allow-dirty: this checks
#    packaging, not whether the work tree is committed).
pkg_args=()
for c in "${CRATES[@]}"; do pkg_args+=(-p "$c"); done
log "cargo package ${CRATES[*]} (v$VERSION)"
cargo package --no-verify --allow-dirty --quiet "${pkg_args[@]}"

# 2. Unpack them into a directory source; the package checksum is the .crate's sha256.
for c in "${CRATES[@]}"; do
  f=$CARGO_TARGET_DIR/package/$c-$VERSION.crate
  tar -xzf "$f" -C "$REG"
  sum=$(sha256sum "$f" | cut -d' ' -f1)
  printf '{"files":{},"package":"%s"}\n' "$sum" >"$REG/$c-$VERSION/.cargo-checksum.json"
done

# 3. The consumer, outside the workspace.
cp -r tests/outside-consumer "$WORK/consumer"
cd "$WORK/consumer"
rm -rf target Cargo.lock .cargo

# 4. Its third-party dependencies, vendored from crates.io (the unpacked slacker crates
#    stand in for crates.io's through [patch] only for this step).
patch=()
for c in "${CRATES[@]}"; do
  patch+=(--config "patch.crates-io.$c.path=\"$REG/$c-$VERSION\"")
done
log "cargo vendor (third-party crates from crates.io)"
cargo vendor --quiet --versioned-dirs "${patch[@]}" "$WORK/thirdparty" >/dev/null
cp -r "$WORK/thirdparty/." "$REG/"
rm -f Cargo.lock

# 5. From here on: no network, no paths. crates.io is replaced by the local registry.
mkdir -p .cargo
cat >.cargo/config.toml <<TOML
[source.crates-io]
replace-with = "slacker-packaged"

[source.slacker-packaged]
directory = "$REG"
TOML

export CARGO_TARGET_DIR="${SLACKER_OUTSIDE_TARGET:-$CARGO_TARGET_DIR/outside-consumer}"
# Cargo takes a registry crate of a known name and version as unchanged and would reuse
# the slacker-* an earlier run compiled here: rebuild them from this run's .crate files.
rm -rf "$CARGO_TARGET_DIR"/debug/.fingerprint/slacker-*
log "dependency tree of the consumer (normal edges):"
cargo tree --offline -e normal --prefix none | sort -u | tee "$WORK/tree" >&2
for heavy in tokio tar flate2 ruzstd serde_json tempfile blake3; do
  if grep -q "^$heavy v" "$WORK/tree"; then
    log "FAIL: $heavy is in the tree of slacker-core with default-features = false"
    exit 1
  fi
done
n=$(cargo tree --offline -p slacker-core -e normal --prefix none | grep -v '(\*)' | sort -u | wc -l)
log "slacker-core with default-features = false: $n crates (itself included)"
if ((n > 15)); then
  log "FAIL: more than 15 crates"
  exit 1
fi

log "cargo test --offline (the conformance suite and the model test)"
CI="${CI:-}" cargo test --offline
grep -A2 '^name = "slacker-core"' Cargo.lock | grep -q 'source = "registry+' \
  || { log "FAIL: slacker-core did not come from the registry"; exit 1; }
log "ok: a crate outside the workspace built and passed the conformance suite on the packaged crates"
