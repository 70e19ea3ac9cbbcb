// Command etcd is the stock etcd server (go.etcd.io/etcd/server/v3/etcdmain), built for the
// operator tests by tests/k8s/build-control-plane.sh.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
