from mmchat.convert.cli import main

raise SystemExit(main())
