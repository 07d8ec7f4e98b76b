"""MAD (Poli et al. 2024) as the MesaNet paper ran it: mad-lab's tasks and variants, the models, a population trainer for the lr × wd grid and Table 9."""
