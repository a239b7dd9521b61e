#!/usr/bin/env bash
# The long suite (Tests/long-tests.txt): training long enough to learn, and whole runs on the kernels' CPU
# emulation. Same setup and build as scripts/test.sh. The kernel harness and the selftest on the emulated
# device are not in it: `bash Benchmarks/gpu/run.sh --emulation` runs them (Tests/gpu-script-tests.txt).
exec bash "$(dirname "$0")/test.sh" --long
