"""The kubelet PodResources v1 API: the proto copied from k8s.io/kubelet and its generated stubs."""
