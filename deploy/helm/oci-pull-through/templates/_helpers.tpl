{{- define "oci-pull-through.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oci-pull-through.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "oci-pull-through.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oci-pull-through.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "oci-pull-through.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "oci-pull-through.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "oci-pull-through.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "oci-pull-through.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, if any. */}}
{{- define "oci-pull-through.s3SecretName" -}}
{{- $creds := .Values.storage.s3.credentials }}
{{- if $creds.existingSecret }}
{{- $creds.existingSecret }}
{{- else if and $creds.accessKeyId $creds.secretAccessKey }}
{{- printf "%s-s3" (include "oci-pull-through.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Secret holding TOKEN_SECRET: the existing one, or the chart's for value/generate. */}}
{{- define "oci-pull-through.tokenSecretName" -}}
{{- if .Values.tokenSecret.existingSecret }}
{{- .Values.tokenSecret.existingSecret }}
{{- else }}
{{- printf "%s-token" (include "oci-pull-through.fullname" .) }}
{{- end }}
{{- end }}

{{/* Combinations the schema cannot express, refused with a message saying what to set. */}}
{{/* Replicas on one S3 bucket find each other (PEERS_DNS): one upstream fetch per object. */}}
{{- define "oci-pull-through.clustered" -}}
{{- if and .Values.cluster.enabled (gt (int .Values.replicaCount) 1) (eq .Values.storage.backend "s3") }}true{{ end }}
{{- end }}

{{- define "oci-pull-through.validate" -}}
{{- $token := .Values.tokenSecret }}
{{- $chosen := 0 }}
{{- range (list $token.existingSecret $token.value $token.generate) }}
{{- if . }}{{ $chosen = add1 $chosen }}{{ end }}
{{- end }}
{{- if ne $chosen 1 }}
{{- fail "tokenSecret: set exactly one of tokenSecret.existingSecret (a Secret with the key TOKEN_SECRET), tokenSecret.value (the key, 16+ characters) or tokenSecret.generate=true. The key must be the same on every render: helm template, Argo CD and other template-based installs need existingSecret or value (lookup sees no cluster there, so a generated key would change on every render); generate suits helm install/upgrade and Flux only." }}
{{- end }}
{{- if and (eq .Values.storage.backend "fs") (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount=%v with storage.backend=fs: the filesystem cache is one ReadWriteOnce claim that a single pod can mount; use replicaCount 1, or storage.backend=s3 for several replicas sharing a bucket." .Values.replicaCount) }}
{{- end }}
{{- end }}

{{/* Pod labels of the release, as a topologySpreadConstraints labelSelector. */}}
{{- define "oci-pull-through.topologySpreadConstraints" -}}
{{- $selector := dict "matchLabels" (include "oci-pull-through.selectorLabels" . | fromYaml) }}
{{- $constraints := list }}
{{- range .Values.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" $selector }}
{{- end }}
{{- $constraints = append $constraints $constraint }}
{{- end }}
{{- toYaml $constraints }}
{{- end }}

{{/* The container's resources, with the spool's ephemeral-storage request unless set. */}}
{{- define "oci-pull-through.resources" -}}
{{- $resources := deepCopy (default dict .Values.resources) }}
{{- $requests := default dict (get $resources "requests") }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" .Values.spool.request }}
{{- end }}
{{- $_ := set $resources "requests" $requests }}
{{- toYaml $resources }}
{{- end }}

{{/* The address clients use: the Ingress host, else the Service's DNS name and port. */}}
{{- define "oci-pull-through.clientAddress" -}}
{{- if and .Values.ingress.enabled .Values.ingress.hosts }}
{{- (first .Values.ingress.hosts).host }}
{{- else }}
{{- printf "%s.%s.svc:%v" (include "oci-pull-through.fullname" .) .Release.Namespace .Values.service.port }}
{{- end }}
{{- end }}

{{/* Labels of the `helm test` pod: not the Service's selector, so it never gets traffic. */}}
{{- define "oci-pull-through.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "oci-pull-through.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
