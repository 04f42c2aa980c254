from sazd.cli import main

raise SystemExit(main())
