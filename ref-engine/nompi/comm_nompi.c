/* comm_open_mpi when the engine is built without MPI (no mpicc found, or MPI=0). */
#include "comm.h"

int comm_open_mpi(comm **c, dsv3_error *err)
{
	*c = NULL;
	if (comm_launched_by_mpirun())
		return dsv3_fail(err, DSV3_EUSAGE, "started by mpirun, but this build has no MPI "
				 "(install OpenMPI's mpicc, e.g. make deps, and rebuild)");
	return 0;
}
