# The environment of bench/delta.sh, built by Debian's Nix without nixpkgs: packages of real
# host ELF files shaped like a Python web service (an interpreter, C libraries, Python
# packages, an app at the top).
#
# `manifest` has one line per package, dependencies before dependants:
#     NAME DEP,DEP,…|- FILE FILE …
# Each package copies its FILEs into lib/ and names its dependencies' store paths in
# nix-support/deps (so Nix records them as references). `changed` names one package that gets
# a new revision (a share/revision file): its store path changes, and so do the store paths of
# every package that depends on it, directly or not, as with any Nix rebuild.
{ bootstrap, manifest, changed ? "", system ? "x86_64-linux" }:
let
  boot = builtins.path { path = bootstrap; name = "nixenv-bench-bootstrap"; };
  man = builtins.path { path = manifest; name = "nixenv-delta-manifest"; };
  text = builtins.readFile manifest;
  lines = builtins.filter (l: builtins.isString l && l != "") (builtins.split "\n" text);
  words = l: builtins.filter (w: builtins.isString w && w != "") (builtins.split " " l);
  fields = l: let w = words l; in {
    name = builtins.elemAt w 0;
    deps = let d = builtins.elemAt w 1; in
      if d == "-" then [ ] else builtins.filter builtins.isString (builtins.split "," d);
  };
  specs = builtins.genList (i: fields (builtins.elemAt lines i) // { line = i + 1; })
    (builtins.length lines);

  mk = spec: derivation {
    inherit system;
    name = "delta-${spec.name}";
    builder = "${boot}/busybox";
    args = [ "sh" "-eu" "-c" (''
      ${boot}/busybox mkdir -p "$TMPDIR/applets"
      ${boot}/busybox --install -s "$TMPDIR/applets"
      export PATH="$TMPDIR/applets"
      mkdir -p "$out/lib" "$out/nix-support"
      k=0
      for f in $(sed -n '${toString spec.line}p' ${man} | cut -d' ' -f3-); do
        k=$((k + 1))
        cat "$f" > "$out/lib/$k-''${f##*/}"
      done
      chmod 0555 "$out/lib/"*
      printf '%s\n' ${builtins.concatStringsSep " " (map (d: "${pkgs.${d}}") spec.deps)} > "$out/nix-support/deps"
    '' + (if spec.name == changed then ''
      mkdir -p "$out/share"
      echo "${spec.name}: next revision" > "$out/share/revision"
    '' else "")) ];
  };

  pkgs = builtins.listToAttrs (map (s: { name = s.name; value = mk s; }) specs);
  top = (builtins.elemAt specs (builtins.length specs - 1)).name;
in
pkgs // { root = pkgs.${top}; }
