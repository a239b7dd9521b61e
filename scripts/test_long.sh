#!/usr/bin/env bash
# The long suite (Tests/long-tests.txt): training long enough to learn, and the kernels and the CUDA
# backend on the kernels' CPU emulation. Same setup and build as scripts/test.sh.
exec bash "$(dirname "$0")/test.sh" --long
