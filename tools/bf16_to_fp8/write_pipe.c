/* dsv3-fp8-to-bf16's writer and tensor-hash pipeline, built into this tool too (one source). */
#include "../fp8_to_bf16/write_pipe.c"
