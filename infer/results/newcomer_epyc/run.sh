#!/usr/bin/env bash
set -u
REPO=${REPO:-$(cd "$(dirname "$0")/../../.." && pwd)}  # the checkout to clone
rm -rf /tmp/nc2 && mkdir -p /tmp/nc2/home && cd /tmp/nc2 && git clone -q "$REPO" repo
export HOME=/tmp/nc2/home
cd /tmp/nc2/repo
python -m venv .venv
source .venv/bin/activate
CMD='python -m infer generate --model smollm2 --chat --prompt "Write a Python function that checks whether a number is prime." --compare'
s=$(date +%s.%N)
( pip install -e . && eval "$CMD" ) > /tmp/nc2/main1.out 2> /tmp/nc2/main1.err
echo "main1 rc=$? seconds=$(echo "$(date +%s.%N) - $s" | bc)" >> /tmp/nc2/times
s=$(date +%s.%N)
( eval "$CMD" ) > /tmp/nc2/main2.out 2> /tmp/nc2/main2.err
echo "main2 (generate alone) rc=$? seconds=$(echo "$(date +%s.%N) - $s" | bc)" >> /tmp/nc2/times
s=$(date +%s.%N)
( pip install -e '.[test]' && python -m pytest -q ) > /tmp/nc2/tests.out 2> /tmp/nc2/tests.err
echo "tests rc=$? seconds=$(echo "$(date +%s.%N) - $s" | bc)" >> /tmp/nc2/times
