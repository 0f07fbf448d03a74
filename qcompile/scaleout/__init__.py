"""Scale-out: executors (in process, local workers, Ray) and many-model builds."""
