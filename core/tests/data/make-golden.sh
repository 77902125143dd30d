#!/bin/sh
# Regenerates the golden files in this directory with real Nix (Debian's nix-bin 2.8), as root.
# Usage: core/tests/data/make-golden.sh
set -eu
out=$(cd "$(dirname "$0")" && pwd)
# Nix with nixenv's own configuration (tests/nix/nix.conf): never the host's /etc/nix, groups
# or users (a fresh Debian has no `nixbld` group, and Nix's sandbox would hide /usr/bin).
nixconf=$(cd "$out/../../.." && pwd)/tests/nix
export NIX_CONF_DIR="$nixconf" NIX_USER_CONF_FILES="$nixconf/nix.conf"
unset NIX_CONFIG
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nixx() { nix --extra-experimental-features nix-command "$@"; }

# 1. A tree with nested directories, executables, symlinks, empty entries and
#    names whose byte order differs from case-insensitive order.
t="$work/golden-tree"
mkdir -p "$t/bin" "$t/share/doc/deep/deeper" "$t/empty-dir"
printf '#!/bin/sh\necho golden\n' > "$t/bin/golden"
chmod 755 "$t/bin/golden"
ln -s golden "$t/bin/golden-link"
ln -s /nix/store/00000000000000000000000000000000-absent/bin/x "$t/bin/absolute-link"
ln -s ../share/doc "$t/docs"
: > "$t/share/empty-file"
seq 1 300 > "$t/share/doc/numbers"
printf 'x' > "$t/share/doc/deep/deeper/one-byte"
printf 'Z' > "$t/share/Zebra"
printf 'a' > "$t/share/apple"
printf 'twelve bytes' > "$t/share/doc/deep/padded-12"
leaf=$(nix-store --add "$t")

# 2. A path that references the tree (built by Nix with the host's /bin/sh; sandbox = false).
cat > "$work/ref.nix" <<NIX
derivation {
  name = "golden-ref";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/bin/mkdir \$out && echo ${leaf} > \$out/leaf-path && /bin/ln -s ${leaf}/bin/golden \$out/golden" ];
  leaf = builtins.storePath "$leaf";
}
NIX
ref=$(nix-build --option substituters "" --no-out-link "$work/ref.nix")

# 3. Keys, signatures and a binary cache.
nix-store --generate-binary-cache-key golden-test-1 "$work/golden.sec" "$out/golden-test-1.pub"
nix-store --generate-binary-cache-key other-test-1 "$work/other.sec" "$out/other-test-1.pub"
nixx store sign --key-file "$work/golden.sec" --recursive "$ref"
nixx copy --to "file://$work/cache?compression=xz" "$ref"
cp "$work/cache/$(basename "$leaf" | cut -c1-32).narinfo" "$out/golden-tree.narinfo"
cp "$work/cache/$(basename "$ref" | cut -c1-32).narinfo" "$out/golden-ref.narinfo"
url=$(sed -n 's/^URL: //p' "$out/golden-tree.narinfo")
cp "$work/cache/$url" "$out/golden-tree.nar.xz"

# 4. NARs as Nix serialises them.
nix-store --dump "$leaf" > "$out/golden-tree.nar"
nix-store --dump "$ref" > "$out/golden-ref.nar"
nix-store --dump "$leaf/bin/golden" > "$out/single-file.nar"
nix-store --dump "$leaf/bin/golden-link" > "$out/single-symlink.nar"

# 5. nixbase32 of known digests: "<hex> <nix-hash --to-base32>" per line.
: > "$out/nixbase32.txt"
for s in "" "a" "abc" "golden" "$leaf"; do
  for ty in sha256 sha1; do
    hex=$(printf '%s' "$s" | ${ty}sum | cut -d' ' -f1)
    echo "$hex $(nix-hash --type "$ty" --to-base32 "$hex")" >> "$out/nixbase32.txt"
  done
done
echo "generated $leaf and $ref"
