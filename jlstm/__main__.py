"""`python -m jlstm ...`, the same as the `jlstm` console script."""

from jlstm.cli import main

raise SystemExit(main())
