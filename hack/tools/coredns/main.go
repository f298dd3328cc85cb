// A CoreDNS with only the plugins the local cluster's DNS needs: cluster names from the API
// server (kubernetes), the address to listen on (bind), cache, health and readiness, errors and
// query logs. The stock build (github.com/coredns/coredns) links every cloud provider's SDK,
// which serves nothing here (pods have no upstream resolver to forward to) and makes a cold
// build much longer on two cores.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order in which the plugins handle a query, as in CoreDNS's plugin.cfg.
var directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
