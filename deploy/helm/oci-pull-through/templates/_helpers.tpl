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

{{/* The Secret holding TOKEN_SECRET, if any. */}}
{{- define "oci-pull-through.tokenSecretName" -}}
{{- if .Values.tokenSecret.existingSecret }}
{{- .Values.tokenSecret.existingSecret }}
{{- else if .Values.tokenSecret.create }}
{{- printf "%s-token" (include "oci-pull-through.fullname" .) }}
{{- end }}
{{- end }}

{{/* The address clients use: the Ingress host, else the Service's DNS name and port. */}}
{{- define "oci-pull-through.clientAddress" -}}
{{- if and .Values.ingress.enabled .Values.ingress.hosts }}
{{- (first .Values.ingress.hosts).host }}
{{- else }}
{{- printf "%s.%s.svc:%v" (include "oci-pull-through.fullname" .) .Release.Namespace .Values.service.port }}
{{- end }}
{{- end }}
