from hpa_scc.cli import main

raise SystemExit(main())
