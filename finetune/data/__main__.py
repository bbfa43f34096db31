from finetune.data.cli import main

raise SystemExit(main())
