{{/*
Names, labels, images and the pieces every fedtune container shares.
*/}}

{{- define "fedtune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release alone when it already contains the chart name. */}}
{{- define "fedtune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fedtune.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedtune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Component names: kept short enough that StatefulSet pod names (+ "-NNN") fit in 63 characters. */}}
{{- define "fedtune.superlink.fullname" -}}
{{- printf "%s-superlink" (include "fedtune.fullname" .) | trunc 55 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedtune.supernode.fullname" -}}
{{- printf "%s-supernode" (include "fedtune.fullname" .) | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedtune.labels" -}}
helm.sh/chart: {{ include "fedtune.chart" . }}
{{ include "fedtune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedtune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fedtune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: (dict "context" $ "component" "superlink"). */}}
{{- define "fedtune.componentLabels" -}}
{{ include "fedtune.labels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fedtune.componentSelectorLabels" -}}
{{ include "fedtune.selectorLabels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fedtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedtune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference: (dict "image" .Values.x.image "global" .Values.global "defaultTag" "..."). */}}
{{- define "fedtune.image" -}}
{{- $registry := coalesce .global.imageRegistry .image.registry -}}
{{- $repository := .image.repository -}}
{{- if $registry -}}{{- $repository = printf "%s/%s" $registry $repository -}}{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .defaultTag .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{- define "fedtune.superlink.image" -}}
{{- include "fedtune.image" (dict "image" .Values.superlink.image "global" .Values.global "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{/* SuperNodes: the `cuda` image in GPU mode, the small `cpu` one otherwise. */}}
{{- define "fedtune.supernode.image" -}}
{{- $tag := ternary "cuda" "cpu" .Values.supernodes.gpu.enabled -}}
{{- include "fedtune.image" (dict "image" .Values.supernodes.image "global" .Values.global "defaultTag" $tag) -}}
{{- end -}}

{{- define "fedtune.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- TLS */}}

{{/* The Secret with ca.crt / tls.crt / tls.key the SuperLink serves with. */}}
{{- define "fedtune.tls.secretName" -}}
{{- if eq .Values.tls.mode "existingSecret" -}}
{{- .Values.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "fedtune.superlink.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secret whose ca.crt clients (SuperNodes, Jobs, helm test) trust. */}}
{{- define "fedtune.tls.caSecretName" -}}
{{- default (include "fedtune.tls.secretName" .) .Values.tls.caSecret -}}
{{- end -}}

{{/* Every DNS name the SuperLink is reached at: Service names, external hostname, extras, and
localhost: the Fleet proxy verifies the SuperLink behind it under that name, and `kubectl port-forward`
users dial it (the CA is the federation's own, so this names nothing public). */}}
{{- define "fedtune.tls.dnsNames" -}}
{{- $svc := include "fedtune.superlink.fullname" . -}}
{{- $ns := include "fedtune.namespace" . -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) -}}
{{- with .Values.superlink.externalHostname }}{{- $names = append $names . -}}{{- end -}}
{{- $names = concat $names .Values.tls.extraDnsNames (list "localhost") | uniq -}}
{{- toJson $names -}}
{{- end -}}

{{/* IP addresses in the certificate: 127.0.0.1 always, because every in-pod client of the SuperLink
(its SuperExec and ServerApp, the exporter, the control container, `kubectl exec` users) dials
127.0.0.1:<internal port> and verifies the certificate against that address. */}}
{{- define "fedtune.tls.ipAddresses" -}}
{{- concat (list "127.0.0.1") .Values.tls.extraIpAddresses | uniq | toJson -}}
{{- end -}}

{{/* In-cluster address of this release's SuperLink: the Fleet proxy (a name in the certificate). */}}
{{- define "fedtune.superlink.internalAddress" -}}
{{- printf "%s.%s.svc:%d" (include "fedtune.superlink.fullname" .) (include "fedtune.namespace" .) (int .Values.superlink.service.port) -}}
{{- end -}}

{{/* Address SuperNodes dial (Fleet API only: the proxy answers 403 to everything else). */}}
{{- define "fedtune.superlink.address" -}}
{{- default (include "fedtune.superlink.internalAddress" .) .Values.supernodes.superlinkAddress -}}
{{- end -}}

{{/* Flower's SuperLink itself (Fleet + Control + Runtime APIs): loopback of the SuperLink pod only. */}}
{{- define "fedtune.superlink.loopbackAddress" -}}
{{- printf "127.0.0.1:%d" (int .Values.superlink.containerPorts.internal) -}}
{{- end -}}

{{/* Mount point of TLS material, and where each launcher reads it from. */}}
{{- define "fedtune.certsDir" -}}/certs{{- end -}}

{{/* ---------------------------------------------------------------- shared container pieces */}}

{{/* flwr must never phone home; HOME/FLWR_HOME are writable although the root fs is read-only. */}}
{{- define "fedtune.flwrEnv" -}}
- name: FLWR_TELEMETRY_ENABLED
  value: "0"
- name: FLWR_DISABLE_UPDATE_CHECK
  value: "1"
- name: HOME
  value: /tmp
- name: FLWR_HOME
  value: /tmp/.flwr
{{- end -}}

{{- define "fedtune.podSecurityContext" -}}
{{- with .Values.podSecurityContext -}}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "fedtune.containerSecurityContext" -}}
{{- with .Values.containerSecurityContext -}}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Volume with only the CA certificate, for clients of the SuperLink. */}}
{{- define "fedtune.caVolume" -}}
- name: ca
  secret:
    secretName: {{ include "fedtune.tls.caSecretName" . }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end -}}

{{/* The control container's files: its script and the run request (one ConfigMap). */}}
{{- define "fedtune.controlConfigName" -}}
{{- printf "%s-control" (include "fedtune.fullname" .) -}}
{{- end -}}

{{/* ---------------------------------------------------------------- SuperNode auth */}}

{{/* "true" when the chart mints the SuperNode keys in the cluster: auth on, SuperNodes in this
release, and no supernodeAuth.existingSecret (user-supplied keys are never minted over). */}}
{{- define "fedtune.supernodeAuth.mint" -}}
{{- if and .Values.supernodeAuth.enabled .Values.supernodes.enabled (not .Values.supernodeAuth.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{/* The Secret with one private key per SuperNode pod, each under the pod's name (minted: also <pod>.pub). */}}
{{- define "fedtune.supernodeAuth.secretName" -}}
{{- default (printf "%s-supernode-auth" (include "fedtune.fullname" .)) .Values.supernodeAuth.existingSecret -}}
{{- end -}}

{{/* "true" when the register hook Job runs. Only the SuperLink's own release registers keys: a
SuperNodes-only release hands its public keys to the SuperLink operator instead. */}}
{{- define "fedtune.supernodeAuth.register" -}}
{{- if and .Values.supernodeAuth.enabled .Values.supernodeAuth.register.enabled .Values.superlink.enabled -}}
true
{{- end -}}
{{- end -}}

{{/* Name of the mint hook Job and of its ServiceAccount, Role and RoleBinding. */}}
{{- define "fedtune.supernodeAuth.mintName" -}}
{{- printf "%s-mint-supernode-keys" (include "fedtune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* ---------------------------------------------------------------- checks */}}
{{- define "fedtune.validateValues" -}}
{{- $messages := list -}}
{{- if and (eq .Values.tls.mode "existingSecret") (not .Values.tls.existingSecret) .Values.superlink.enabled -}}
{{- $messages = append $messages "tls.mode=existingSecret needs tls.existingSecret (a Secret with ca.crt, tls.crt, tls.key)" -}}
{{- end -}}
{{- if and (not .Values.superlink.enabled) .Values.supernodes.enabled -}}
{{- if not .Values.supernodes.superlinkAddress -}}
{{- $messages = append $messages "superlink.enabled=false (SuperNodes only) needs supernodes.superlinkAddress HOST:PORT" -}}
{{- end -}}
{{- if and (not .Values.tls.caSecret) (ne .Values.tls.mode "existingSecret") -}}
{{- $messages = append $messages "superlink.enabled=false (SuperNodes only) needs tls.caSecret: a Secret with the federation's ca.crt" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.supernodes.superlinkAddress (not (contains ":" .Values.supernodes.superlinkAddress)) -}}
{{- $messages = append $messages (printf "supernodes.superlinkAddress must be HOST:PORT, got %q" .Values.supernodes.superlinkAddress) -}}
{{- end -}}
{{- if gt (add .Values.supernodes.partitionOffset .Values.supernodes.replicaCount) (int .Values.supernodes.numPartitions) -}}
{{- $messages = append $messages (printf "supernodes: partitionOffset (%d) + replicaCount (%d) exceeds numPartitions (%d); pod ordinals map to partitions offset..offset+replicas-1" (int .Values.supernodes.partitionOffset) (int .Values.supernodes.replicaCount) (int .Values.supernodes.numPartitions)) -}}
{{- end -}}
{{- if and (include "fedtune.supernodeAuth.register" .) .Values.supernodeAuth.existingSecret .Values.supernodes.enabled (not .Values.supernodeAuth.publicKeys) (not .Values.supernodeAuth.publicKeysConfigMap) -}}
{{- $messages = append $messages "supernodeAuth.existingSecret holds only private keys: give their public keys in supernodeAuth.publicKeys (or publicKeysConfigMap), set supernodeAuth.register.enabled=false to register them yourself, or leave existingSecret empty to have the keys minted in the cluster" -}}
{{- end -}}
{{- if and .Values.superlink.ingress.enabled (not .Values.superlink.externalHostname) -}}
{{- $messages = append $messages "superlink.ingress.enabled needs superlink.externalHostname" -}}
{{- end -}}
{{- if and (eq .Values.supernodes.modelCache.type "existingClaim") (not .Values.supernodes.modelCache.existingClaim) -}}
{{- $messages = append $messages "supernodes.modelCache.type=existingClaim needs supernodes.modelCache.existingClaim" -}}
{{- end -}}
{{- if $messages -}}
{{- fail (printf "\nfedtune: invalid values:\n  - %s" (join "\n  - " $messages)) -}}
{{- end -}}
{{- end -}}

{{/* storageClassName from a value: "" = cluster default (omitted), "-" = no dynamic provisioning. */}}
{{- define "fedtune.storageClass" -}}
{{- if . -}}
{{- if eq "-" . -}}
storageClassName: ""
{{- else -}}
storageClassName: {{ . | quote }}
{{- end -}}
{{- end -}}
{{- end -}}
