from mesh.cli import main
import sys
sys.exit(main())
