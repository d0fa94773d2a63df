set -e
REPO=$(cd "$(dirname "$0")/../../.." && pwd)  # run from a checkout with its venv active
cd /tmp && rm -rf /tmp/ctx128 && mkdir /tmp/ctx128
PYTHONPATH=$REPO python -c "
from tests.conftest import build_hf_model
build_hf_model('llama', vocab_size=48, max_position_embeddings=128).save_pretrained('/tmp/ctx128/base')
"
cd "$REPO"
python -m train lookahead --model /tmp/ctx128/base --out /tmp/ctx128/run --k 4 --steps 20 --seq-len 128 --self-samples 16 --batch-size 4 --save-every 10 --eval-every 10 --quiet --compile-cache off
python -m infer generate --model /tmp/ctx128/base --lookahead /tmp/ctx128/run --prompt-ids 5 --max-new-tokens 127 --compare --json --compile-cache off | python -c "import json,sys; d=json.load(sys.stdin); print('new tokens', len(d['token_ids'][0]), 'tokens/pass', round(d['stats']['tokens_per_forward'],2), 'identical', d['token_ids']==d['autoregressive']['token_ids'])"
tail -1 /tmp/ctx128/run/metrics.jsonl | cut -c1-200
