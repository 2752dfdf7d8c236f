#!/usr/bin/env bash
# Tokenize a corpus on a Slurm cluster: one array task per input file, then one merge job.
#
#   slurm/submit_preprocess.sh --input '/data/corpus/*.jsonl.zst' --output-prefix /data/shards/corpus \
#       --tokenizer /data/tokenizer.json [--max-parallel 64] [--dry-run] [-- extra sbatch options]
#
# Extra preprocess_data.py options go in WEFT_PREPROCESS_ARGS (e.g. "--json-keys content --strict").
set -euo pipefail
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
WEFT_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export WEFT_HOME
input="" prefix="" tokenizer="" max_parallel=64 dry_run=0 sbatch_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --input) input=$2; shift 2 ;;
        --output-prefix) prefix=$2; shift 2 ;;
        --tokenizer) tokenizer=$2; shift 2 ;;
        --max-parallel) max_parallel=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; sbatch_args=("$@"); break ;;
        *) echo "unknown option: $1" >&2; usage 2 ;;
    esac
done
[ -n "$input" ] && [ -n "$prefix" ] && [ -n "$tokenizer" ] || { echo "--input, --output-prefix and --tokenizer are required" >&2; usage 2; }
prefix=$(realpath -m "$prefix")
[ "$tokenizer" = byte ] || tokenizer=$(realpath "$tokenizer")
mkdir -p "$(dirname "$prefix")"
list="$prefix.files.txt"
# The file list fixes the order of the parts, and so of the documents in the merged shard.
PYTHON=${WEFT_PYTHON:-python3}
"$PYTHON" -c 'import os, sys; sys.path.insert(0, os.environ["WEFT_HOME"])
from engine.data.sources import expand_inputs
print("\n".join(os.path.abspath(f) for f in expand_inputs(sys.argv[1:])))' "$input" > "$list"
n=$(wc -l < "$list")
[ "$n" -gt 0 ] || { echo "no input files match $input" >&2; exit 2; }
export WEFT_FILE_LIST=$list WEFT_OUTPUT_PREFIX=$prefix WEFT_TOKENIZER=$tokenizer WEFT_NUM_PARTS=$n
logs="$(dirname "$prefix")/slurm-logs"
mkdir -p "$logs"
array=(sbatch --parsable --export=ALL --array="0-$((n - 1))%$max_parallel" --output="$logs/preprocess-%A_%a.out"
       "${sbatch_args[@]}" "$WEFT_HOME/slurm/preprocess.sbatch")
if [ "$dry_run" = 1 ]; then
    echo "$n input files listed in $list"; echo "${array[*]}"
    echo "sbatch --parsable --export=ALL --dependency=afterok:<array job> --output=$logs/merge-%j.out ${sbatch_args[*]} $WEFT_HOME/slurm/merge_shards.sbatch"
    exit 0
fi
array_job=$("${array[@]}")
array_job=${array_job%%;*}
merge_job=$(sbatch --parsable --export=ALL --dependency="afterok:$array_job" --output="$logs/merge-%j.out" \
    "${sbatch_args[@]}" "$WEFT_HOME/slurm/merge_shards.sbatch")
echo "submitted $n preprocessing tasks as job $array_job and the merge as job ${merge_job%%;*}; logs in $logs"
