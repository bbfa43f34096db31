from finetune.demo.build import main

raise SystemExit(main())
