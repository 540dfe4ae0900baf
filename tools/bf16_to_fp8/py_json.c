/* dsv3-fp8-to-bf16's json.dump(indent=2) writer of the index, built into this tool too. */
#include "../fp8_to_bf16/py_json.c"
