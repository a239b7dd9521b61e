// Umbrella header of the C layer: kernel ABI + loader, counter-based RNG, quantized block formats.
#include "relora_abi.h"
#include "relora_rng.h"
#include "relora_quant.h"
