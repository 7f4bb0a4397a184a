from tokensettle.cli import main

raise SystemExit(main())
