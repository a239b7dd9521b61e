// Umbrella header of the C layer: kernel ABI + loader, counter-based RNG.
#include "relora_abi.h"
#include "relora_rng.h"
