#!/usr/bin/env bash
# A source tree for bench/ab_probe.py: bench/.trees/NAME/src.
#   bash bench/ab_tree.sh NAME COMMIT            COMMIT's src (git archive)
#   bash bench/ab_tree.sh NAME COMMIT FILE...    HEAD's src with FILEs (paths under src/) as COMMIT has them: one
#                                                change compared alone, the tables and the rest as HEAD has them
# bench/.trees is git-ignored; give it to the device call as carry: ["bench/.trees"].
set -euo pipefail
name=$1 commit=$2
shift 2
cd "$(git rev-parse --show-toplevel)"
tree=bench/.trees/$name
rm -rf "$tree"
mkdir -p "$tree"
if (($#)); then
  git archive HEAD src | tar -x -C "$tree"
  for file in "$@"; do
    git show "$commit:$file" >"$tree/$file"
  done
else
  git archive "$commit" src | tar -x -C "$tree"
fi
echo "$tree/src: $(git rev-parse --short "$commit")${*:+ ($* on HEAD $(git rev-parse --short HEAD))}"
