"""Lightning callbacks of lmforge."""
