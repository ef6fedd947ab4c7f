#!/usr/bin/env bash
# The recipe of the embedded default model (assets/default-model): fetches the King James Bible
# from Debian's packages (public domain; see assets/default-model/CORPUS.md), turns it into plain
# text (one verse a line, chapters as documents), trains the `tiny` preset with a fixed seed, and
# copies the result into assets/default-model. About 50 minutes on the 2-core CI machine.
#
#   bash scripts/train-default-model.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/default-model}
mkdir -p "$work/deb" "$work/root"
(
    cd "$work/deb"
    # Pinned versions: the text and the program that prints it.
    apt-get download bible-kjv-text=4.38 bible-kjv=4.38 2>/dev/null
)
for deb in "$work"/deb/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
# Verse lines become plain lines (verse numbers dropped); a chapter heading starts a document.
"$work/root/usr/bin/bible" -p "$work/root/usr/lib" -l9999 "gen1:1-rev22:21" |
    awk '/^  [0-9]+ /{sub(/^  [0-9]+ /,""); print; next} /^[^ ]/{print ""}' | cat -s | sed '1{/^$/d}' > "$work/kjv.txt"
echo "82a24e4e23c644fe579ed387b20e54eb529cc0a87a25e0810064edb2216780c2  $work/kjv.txt" | sha256sum -c -
cargo build --release -p hymba-cli -j2
./target/release/hymba train --config tiny --data "$work/kjv.txt" --out "$work/model" \
    --vocab-size 4096 --steps 1000 --batch 8 --seq-len 256 --lr 3e-3 --warmup 50 --seed 0 \
    --eval-every 100 --save-every 100
mkdir -p assets/default-model
cp "$work"/model/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,loss.png,metrics.json} assets/default-model/
