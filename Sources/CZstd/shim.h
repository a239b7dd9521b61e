// libzstd (Debian: libzstd-dev), used for compressed checkpoint export.
#include <zstd.h>
