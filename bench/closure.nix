# Synthetic closures for bench/pull.sh, built by Debian's Nix without nixpkgs.
#
# `big`:   N directory paths of real host ELF binaries (the manifest gives each path its own
#          files, so no two paths share content) with a DAG of references: paths 0…chain-1 form
#          one dependency chain, every later path i references two pseudo-random earlier paths;
#          `big-root` references them all.
# `small`: 1,000 single-file paths (builtins.toFile, no build needed), each referencing the
#          previous one and a pseudo-random earlier one; `small-root` references them all.
{ bootstrap, manifest, n, chain ? 50, smallN ? 1000, system ? "x86_64-linux" }:
let
  boot = builtins.path { path = bootstrap; name = "nixenv-bench-bootstrap"; };
  man = builtins.path { path = manifest; name = "nixenv-bench-manifest"; };
  mod = a: b: a - (a / b) * b;
  uniq = l: builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ] l;

  bigDeps = i:
    if i == 0 then [ ]
    else if i < chain then [ (i - 1) ]
    else uniq [ (mod (i * 7919) i) (mod (i * 104729 + 17) i) ];

  mk = name: script: derivation {
    inherit name system;
    builder = "${boot}/busybox";
    args = [ "sh" "-eu" "-c" ''
      ${boot}/busybox mkdir -p "$TMPDIR/applets"
      ${boot}/busybox --install -s "$TMPDIR/applets"
      export PATH="$TMPDIR/applets"
      ${script}
    '' ];
  };

  big = builtins.genList (i: mk "bench-${toString i}" ''
    mkdir -p "$out/lib" "$out/nix-support"
    k=0
    for f in $(sed -n '${toString (i + 1)}p' ${man}); do
      k=$((k + 1))
      cat "$f" > "$out/lib/$k-''${f##*/}"
    done
    chmod 0555 "$out/lib/"*
    printf '%s\n' ${builtins.concatStringsSep " " (map (j: "${builtins.elemAt big j}") (bigDeps i))} > "$out/nix-support/deps"
  '') n;

  small = builtins.genList (i: builtins.toFile "small-${toString i}" ''
    small path ${toString i}
    ${if i == 0 then "" else builtins.elemAt small (i - 1)}
    ${if i < 2 then "" else builtins.elemAt small (mod (i * 7919) (i - 1))}
  '') smallN;
in
{
  big-root = mk "bench-big-root" ''
    mkdir -p "$out/nix-support"
    printf '%s\n' ${builtins.concatStringsSep " " (map toString big)} > "$out/nix-support/deps"
  '';
  small-root = mk "bench-small-root" ''
    mkdir -p "$out/nix-support"
    printf '%s\n' ${builtins.concatStringsSep " " small} > "$out/nix-support/deps"
  '';
}
