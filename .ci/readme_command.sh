#!/usr/bin/env bash
# Run one of the README's set-up commands, exactly as written there.
# The command is the first line of the ```bash block that follows `<!-- command:NAME -->`.
set -euo pipefail
name=$1
cmd=$(awk -v tag="<!-- command:$name -->" '
  $0 == tag {found=1; next}
  found && /^```/ {inblock++; if (inblock == 2) exit; next}
  found && inblock == 1 && NF {print; exit}
' README.md)
if [ -z "$cmd" ]; then
  echo "README.md has no command block tagged command:$name" >&2
  exit 1
fi
echo "+ $cmd"
bash -euo pipefail -c "$cmd"
