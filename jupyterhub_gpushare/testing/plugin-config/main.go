// Command gpushare-plugin-config reads NVIDIA device plugin configs with the
// plugin's own code (github.com/NVIDIA/k8s-device-plugin/api/config/v1) and
// prints, as JSON, what the plugin makes of each one: the error it exits with,
// or the config it runs with, the warnings it logs, and what that means for the
// full GPUs of a node (the nvidia.com/gpu resource).
//
// jupyterhub-gpushare's tests use it twice: the device-plugin stand-in advertises
// capacity and sets labels from its answer, and a test compares gpushare's own
// config reader with it on a corpus of tricky configs.
//
//	gpushare-plugin-config < config.yaml            one config in, one JSON object out
//	gpushare-plugin-config --batch < configs.json   a JSON list of configs in, a list out
//	gpushare-plugin-config --list-and-watch-bytes 8,4096
//
// The last form prints the size in bytes of the ListAndWatch message the plugin
// sends the kubelet for a node with 8 GPUs shared 4096 ways (one device per slice):
// the kubelet's gRPC client takes at most 4 MiB, which bounds the slices per node.
//
// Built and cached by build-plugin-config.sh next to this folder.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	spec "github.com/NVIDIA/k8s-device-plugin/api/config/v1"
	cli "github.com/urfave/cli/v2"
	"google.golang.org/protobuf/proto"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// pluginVersion is set at build time (-X main.pluginVersion=...).
var pluginVersion = "unknown"

const fullGPU = spec.ResourceName(spec.ResourceNamePrefix + "/gpu")

// FullGPUs is what a node shows for its full GPUs once the plugin and GPU
// feature discovery run with the config.
type FullGPUs struct {
	// Resource is the name the slices are advertised under.
	Resource string `json:"resource"`
	// DevicesPerGPU is how many devices the plugin lists for each GPU: one per
	// replica. Several entries for nvidia.com/gpu add up to the largest count,
	// because each writes replica IDs 0..n-1 into the same device map.
	DevicesPerGPU int `json:"devicesPerGPU"`
	// LabelReplicas is the nvidia.com/gpu.replicas label: GFD takes the first
	// entry for nvidia.com/gpu, 1 when there is none.
	LabelReplicas int `json:"labelReplicas"`
	// Strategy is the nvidia.com/gpu.sharing-strategy label.
	Strategy string `json:"strategy"`
	// Renamed: the product label keeps its name (no -SHARED suffix).
	Renamed bool `json:"renamed"`
	// FailRequestsGreaterThanOne: a pod asking for more than one slice is refused.
	FailRequestsGreaterThanOne bool `json:"failRequestsGreaterThanOne"`
}

// Reading is the answer for one config.
type Reading struct {
	OK       bool         `json:"ok"`
	Error    string       `json:"error,omitempty"`
	Warnings []string     `json:"warnings"`
	Config   *spec.Config `json:"config,omitempty"`
	// SharingStrategy is Sharing.SharingStrategy(): mps, time-slicing or none.
	SharingStrategy string    `json:"sharingStrategy,omitempty"`
	GPU             *FullGPUs `json:"gpu,omitempty"`
	PluginVersion   string    `json:"pluginVersion"`
}

// read parses a config the way the device plugin's start-up does: NewConfig on
// a config file (through a cli.Context, as the plugin's command line passes it),
// then DisableResourceNamingInConfig, which logs what it ignores.
func read(text string, dir string) Reading {
	reading := Reading{Warnings: []string{}, PluginVersion: pluginVersion}
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		reading.Error = err.Error()
		return reading
	}
	// klog writes a message to the writer of its severity and of every lower one:
	// one writer (WARNING) sees warnings and errors once each
	var logged bytes.Buffer
	klog.SetOutputBySeverity("INFO", io.Discard)
	klog.SetOutputBySeverity("WARNING", &logged)
	klog.SetOutputBySeverity("ERROR", io.Discard)
	klog.SetOutputBySeverity("FATAL", io.Discard)

	var config *spec.Config
	app := &cli.App{
		Name:   "gpushare-plugin-config",
		Flags:  []cli.Flag{&cli.StringFlag{Name: "config-file"}},
		Writer: io.Discard,
		Action: func(c *cli.Context) error {
			var err error
			config, err = spec.NewConfig(c, nil)
			return err
		},
	}
	if err := app.Run([]string{app.Name, "--config-file", path}); err != nil {
		reading.Error = err.Error()
		return reading
	}
	spec.DisableResourceNamingInConfig(config)
	klog.Flush()
	reading.Warnings = logLines(logged.String())

	reading.OK = true
	reading.Config = config
	reading.SharingStrategy = string(config.Sharing.SharingStrategy())
	reading.GPU = fullGPUs(config)
	return reading
}

func fullGPUs(config *spec.Config) *FullGPUs {
	active := config.Sharing.ReplicatedResources()
	gpus := &FullGPUs{
		Resource:      string(fullGPU),
		DevicesPerGPU: 1,
		LabelReplicas: 1,
		Strategy:      string(spec.SharingStrategyNone),
	}
	first := true
	for _, r := range active.Resources {
		if r.Name != fullGPU {
			continue
		}
		if first {
			first = false
			if r.Replicas > 0 {
				gpus.LabelReplicas = r.Replicas
			}
			if r.Rename != "" {
				gpus.Resource = string(r.Rename)
				gpus.Renamed = true
			}
		}
		if r.Replicas > gpus.DevicesPerGPU {
			gpus.DevicesPerGPU = r.Replicas
		}
	}
	if gpus.LabelReplicas > 1 {
		gpus.Strategy = string(config.Sharing.SharingStrategy())
	}
	// The field is a bool in v0.19 and a *bool from v0.20 on: read it through
	// JSON so this program builds against both.
	var section struct {
		FailRequestsGreaterThanOne *bool `json:"failRequestsGreaterThanOne"`
	}
	if encoded, err := json.Marshal(active); err == nil && json.Unmarshal(encoded, &section) == nil {
		gpus.FailRequestsGreaterThanOne = section.FailRequestsGreaterThanOne != nil &&
			*section.FailRequestsGreaterThanOne
	}
	return gpus
}

// listAndWatchBytes is the size of the ListAndWatch response the plugin sends the
// kubelet for a node with gpus full GPUs shared replicas ways: one healthy device
// per slice, named <GPU UUID>::<replica> as the plugin names replicas, on NUMA
// node 1 (node 0 would encode shorter).
func listAndWatchBytes(gpus, replicas int) int {
	response := &pluginapi.ListAndWatchResponse{}
	for g := 0; g < gpus; g++ {
		uuid := fmt.Sprintf("GPU-%08x-0000-4000-8000-%012x", g, g)
		for r := 0; r < replicas; r++ {
			response.Devices = append(response.Devices, &pluginapi.Device{
				ID:       fmt.Sprintf("%s::%d", uuid, r),
				Health:   pluginapi.Healthy,
				Topology: &pluginapi.TopologyInfo{Nodes: []*pluginapi.NUMANode{{ID: 1}}},
			})
		}
	}
	return proto.Size(response)
}

// logLines turns klog output into messages, without klog's header.
func logLines(output string) []string {
	lines := []string{}
	scanner := bufio.NewScanner(strings.NewReader(output))
	for scanner.Scan() {
		line := scanner.Text()
		if _, message, found := strings.Cut(line, "] "); found {
			line = message
		}
		if line = strings.TrimSpace(line); line != "" {
			lines = append(lines, line)
		}
	}
	return lines
}

func main() {
	batch := flag.Bool("batch", false, "read a JSON list of configs, print a JSON list of readings")
	version := flag.Bool("version", false, "print the device plugin version this was built with")
	sizeOf := flag.String("list-and-watch-bytes", "", "GPUS,REPLICAS: print the size of the plugin's ListAndWatch message")
	klogFlags := flag.NewFlagSet("klog", flag.ExitOnError)
	klog.InitFlags(klogFlags)
	_ = klogFlags.Set("logtostderr", "false")
	_ = klogFlags.Set("alsologtostderr", "false")
	_ = klogFlags.Set("stderrthreshold", "FATAL")
	flag.Parse()
	if *version {
		fmt.Println(pluginVersion)
		return
	}
	if *sizeOf != "" {
		gpus, replicas, found := strings.Cut(*sizeOf, ",")
		g, err1 := strconv.Atoi(gpus)
		r, err2 := strconv.Atoi(replicas)
		if !found || err1 != nil || err2 != nil || g < 1 || r < 1 {
			fail(fmt.Errorf("--list-and-watch-bytes wants GPUS,REPLICAS, not %q", *sizeOf))
		}
		fmt.Println(listAndWatchBytes(g, r))
		return
	}

	dir, err := os.MkdirTemp("", "gpushare-plugin-config-")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(dir)

	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	var answer any
	if *batch {
		var texts []string
		if err := json.Unmarshal(input, &texts); err != nil {
			fail(fmt.Errorf("--batch wants a JSON list of strings: %w", err))
		}
		readings := make([]Reading, len(texts))
		for i, text := range texts {
			readings[i] = read(text, dir)
		}
		answer = readings
	} else {
		answer = read(string(input), dir)
	}
	encoded, err := json.Marshal(answer)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(encoded))
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "gpushare-plugin-config: %v\n", err)
	os.Exit(2)
}
